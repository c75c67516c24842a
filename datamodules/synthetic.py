"""The built-in synthetic crowd: deterministic images of people with exact labels, no download.

Each image is drawn from its own random stream `(seed, split, index)`, so a sample is reproducible
on its own and in any order (also across DataLoader workers and DDP ranks).

Scene model (a cheap perspective crowd):
- a background with a vertical gradient (sky / ground) and random low-contrast clutter
  (rectangles and lines) that is *not* a person;
- people stand on a ground plane: the image row of a person's head sets its scale, so heads shrink
  towards the horizon (top) and crowds are denser there;
- a person is an elliptic head (skin tones, some hair) over an elliptic torso in a clothing colour;
- people are painted far to near, so nearer people occlude farther ones. A person whose head point
  ends up occluded by someone nearer is removed, so every kept point lies inside its own mask.

Labels: `points` (head centres), `boxes` (full visible-person boxes, xyxy), `head_boxes`, and
`instance_map` (visible pixels of person k have id k + 1, in the order of `points`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from crowdseg.errors import DataError

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SKIN = np.array([[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36]], np.float32)


@dataclass(frozen=True)
class SyntheticSpec:
    height: int = 256
    width: int = 256
    min_people: int = 5
    max_people: int = 120
    seed: int = 0
    full_boxes: bool = False  # also label `full_boxes`: each person's whole (amodal) head + torso box
    person_scale: float = 1.0  # people this many times larger (more occlusion: a zoomed-in crowd)


def render_crowd(spec: SyntheticSpec, split: str, index: int) -> dict:
    """Draw image `index` of `split`. Returns numpy arrays: image (H, W, 3) uint8, points (N, 2)
    float32 xy, boxes (N, 4), head_boxes (N, 4) float32 xyxy, instance_map (H, W) int32."""
    rng = np.random.default_rng([spec.seed, SPLIT_IDS.get(split, 3), index])
    h, w = spec.height, spec.width
    image = _background(rng, h, w)
    owner = np.zeros((h, w), np.int32)  # person index + 1 of the painted pixel, 0 = background

    # Number of people: log-uniform between min and max, so sparse and dense scenes are both common.
    n = int(round(np.exp(rng.uniform(np.log(max(spec.min_people, 1)), np.log(spec.max_people + 1)))))
    n = int(np.clip(n, spec.min_people, spec.max_people))
    # Head rows: more people towards the horizon (top), as in a perspective view of a ground plane.
    ys = h * (0.08 + 0.9 * rng.uniform(0, 1, n) ** 1.6)
    xs = rng.uniform(0.02 * w, 0.98 * w, n)
    head_r = (0.008 + 0.03 * ys / h) * min(h, w) * rng.uniform(0.85, 1.15, n)
    if spec.person_scale != 1.0:
        head_r = head_r * spec.person_scale
    order = np.argsort(ys)  # far (small y) first, near people painted last
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    full = np.zeros((n, 4), np.float32)  # whole-person boxes, occluded parts included
    for k in order:
        r, cx, cy = head_r[k], xs[k], ys[k]
        body_color = rng.uniform(20, 235, 3).astype(np.float32)
        skin = SKIN[rng.integers(len(SKIN))] * rng.uniform(0.85, 1.05)
        # torso: an ellipse below the head, about 1.6 head widths wide and 3 heads tall
        tx, ty, ta, tb = cx + rng.normal(0, 0.2 * r), cy + 3.2 * r, 1.6 * r, 2.6 * r
        full[k] = (min(cx - r, tx - ta), cy - 1.15 * r, max(cx + r, tx + ta), ty + tb)
        _paint_ellipse(image, owner, yy, xx, tx, ty, ta, tb, body_color, k + 1)
        _paint_ellipse(image, owner, yy, xx, cx, cy, r, 1.15 * r, skin, k + 1)
        if rng.uniform() < 0.7:  # hair: the upper part of the head in a dark colour
            hair = rng.uniform(10, 90, 3).astype(np.float32)
            _paint_ellipse(image, owner, yy, xx, cx, cy - 0.45 * r, 0.95 * r, 0.7 * r, hair, k + 1,
                           clip_to=owner == k + 1)

    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    labels = _labels_from_owner(image, owner, xs, ys, head_r)
    if spec.full_boxes:
        labels["full_boxes"] = _kept_full_boxes(owner, xs, ys, full)
    return labels


def _kept_full_boxes(owner, xs, ys, full) -> np.ndarray:
    """The whole-person boxes (N, 4) of the people `_labels_from_owner` keeps, in its order, clipped
    to the image (a box may cover pixels of nearer people: it is the box a person annotator draws)."""
    h, w = owner.shape
    rows = np.clip(np.round(ys).astype(int), 0, h - 1)
    cols = np.clip(np.round(xs).astype(int), 0, w - 1)
    keep = np.flatnonzero(owner[rows, cols] == np.arange(1, len(xs) + 1))
    keep = keep[np.lexsort((xs[keep], ys[keep]))]
    return np.clip(full[keep], 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32).reshape(-1, 4)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(40, 160, 3)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.float32).copy()
    for _ in range(int(rng.integers(3, 12))):  # clutter: rectangles and thick lines
        color = image[int(rng.integers(h)), int(rng.integers(w))] + rng.normal(0, 25, 3)
        if rng.uniform() < 0.6:
            x0, y0 = int(rng.integers(w)), int(rng.integers(h))
            x1, y1 = x0 + int(rng.integers(4, w // 3)), y0 + int(rng.integers(4, h // 3))
            image[y0:y1, x0:x1] = color
        else:
            y = int(rng.integers(h))
            image[y:y + int(rng.integers(1, 4)), :] = color
    return image


def _paint_ellipse(image, owner, yy, xx, cx, cy, a, b, color, ident, clip_to=None):
    y0, y1 = max(int(cy - b) - 1, 0), min(int(cy + b) + 2, image.shape[0])
    x0, x1 = max(int(cx - a) - 1, 0), min(int(cx + a) + 2, image.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    inside = ((xx[y0:y1, x0:x1] - cx) / a) ** 2 + ((yy[y0:y1, x0:x1] - cy) / b) ** 2 <= 1.0
    if clip_to is not None:
        inside &= clip_to[y0:y1, x0:x1]
    # soft shading so a person is not a flat colour
    shade = 1.0 - 0.25 * ((yy[y0:y1, x0:x1] - (cy - b)) / (2 * b)).clip(0, 1)[..., None]
    image[y0:y1, x0:x1][inside] = (color * shade)[inside]
    owner[y0:y1, x0:x1][inside] = ident


def _labels_from_owner(image, owner, xs, ys, head_r) -> dict:
    h, w = owner.shape
    rows = np.clip(np.round(ys).astype(int), 0, h - 1)
    cols = np.clip(np.round(xs).astype(int), 0, w - 1)
    visible = owner[rows, cols] == np.arange(1, len(xs) + 1)  # head point still owned by its person
    # Keep visible people in raster order of their head point: a stable, readable order.
    keep = np.flatnonzero(visible)
    keep = keep[np.lexsort((xs[keep], ys[keep]))]
    remap = np.zeros(len(xs) + 1, np.int32)
    remap[keep + 1] = np.arange(1, len(keep) + 1)
    instance_map = remap[owner]

    points = np.stack([xs[keep], ys[keep]], 1).astype(np.float32) if len(keep) else np.zeros((0, 2), np.float32)
    r = head_r[keep]
    head_boxes = np.stack([xs[keep] - r, ys[keep] - 1.15 * r, xs[keep] + r, ys[keep] + 1.15 * r], 1)
    head_boxes = np.clip(head_boxes, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32).reshape(-1, 4)
    boxes = np.zeros((len(keep), 4), np.float32)
    if len(keep):
        ids = instance_map.ravel()
        flat = np.arange(ids.size)
        fg = ids > 0
        ys_all, xs_all = flat[fg] // w, flat[fg] % w
        for col, fn, src in ((0, np.minimum, xs_all), (1, np.minimum, ys_all), (2, np.maximum, xs_all), (3, np.maximum, ys_all)):
            init = np.full(len(keep) + 1, np.inf if fn is np.minimum else -np.inf)
            fn.at(init, ids[fg], src)
            boxes[:, col] = init[1:]
    return {"image": image, "points": points, "boxes": boxes, "head_boxes": head_boxes,
            "instance_map": instance_map.astype(np.int32)}


class SyntheticCrowd(Dataset):
    """`num_images` synthetic crowd samples of `split` in the data contract (datamodules/types.py).

    `transform`, if given, maps a sample dict to a sample dict (e.g. random crop + flip).
    """

    def __init__(self, num_images: int, split: str = "train", spec: SyntheticSpec = SyntheticSpec(),
                 transform=None, indices: Sequence[int] | None = None):
        self.num_images, self.split, self.spec, self.transform = num_images, split, spec, transform
        self.indices = list(range(num_images)) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def names(self) -> list[str]:
        return [self.image_name(i) for i in self.indices]

    def image_name(self, index: int) -> str:
        return f"{self.split}_{index:05d}.png"

    def subset(self, names, transform="same") -> "SyntheticCrowd":
        """The images named in `names` (in this dataset's order), optionally with another transform."""
        wanted = set(names)
        missing = wanted - set(self.names)
        if missing:
            raise DataError(f"synthetic: {len(missing)} name(s) are not in this dataset, e.g. {sorted(missing)[0]!r}")
        return SyntheticCrowd(self.num_images, self.split, self.spec, self.transform if transform == "same" else transform,
                              [i for i in self.indices if self.image_name(i) in wanted])

    def point_counts(self) -> list[int]:
        """The number of people of every image (renders them; no augmentation)."""
        return [len(render_crowd(self.spec, self.split, i)["points"]) for i in self.indices]

    def __getitem__(self, position: int) -> dict:
        if not 0 <= position < len(self.indices):
            raise IndexError(position)
        index = self.indices[position]
        raw = render_crowd(self.spec, self.split, index)
        h, w = raw["instance_map"].shape
        sample = {
            "image": torch.from_numpy(raw["image"]).permute(2, 0, 1).float().div_(255.0),
            "points": torch.from_numpy(raw["points"]),
            "boxes": torch.from_numpy(raw["boxes"]),
            "head_boxes": torch.from_numpy(raw["head_boxes"]),
            "instance_map": torch.from_numpy(raw["instance_map"]).long(),
            "meta": {"dataset": "synthetic", "name": self.image_name(index),
                     "orig_size": (h, w), "scale": 1.0},
        }
        if self.spec.full_boxes:
            sample["full_boxes"] = torch.from_numpy(raw["full_boxes"])
        return self.transform(sample) if self.transform is not None else sample
