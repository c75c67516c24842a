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

import numpy as np
import torch
from torch.utils.data import Dataset

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SKIN = np.array([[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36]], np.float32)


@dataclass(frozen=True)
class SyntheticSpec:
    height: int = 256
    width: int = 256
    min_people: int = 5
    max_people: int = 120
    seed: int = 0


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
    order = np.argsort(ys)  # far (small y) first, near people painted last
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    for k in order:
        r, cx, cy = head_r[k], xs[k], ys[k]
        body_color = rng.uniform(20, 235, 3).astype(np.float32)
        skin = SKIN[rng.integers(len(SKIN))] * rng.uniform(0.85, 1.05)
        # torso: an ellipse below the head, about 1.6 head widths wide and 3 heads tall
        tx, ty, ta, tb = cx + rng.normal(0, 0.2 * r), cy + 3.2 * r, 1.6 * r, 2.6 * r
        _paint_ellipse(image, owner, yy, xx, tx, ty, ta, tb, body_color, k + 1)
        _paint_ellipse(image, owner, yy, xx, cx, cy, r, 1.15 * r, skin, k + 1)
        if rng.uniform() < 0.7:  # hair: the upper part of the head in a dark colour
            hair = rng.uniform(10, 90, 3).astype(np.float32)
            _paint_ellipse(image, owner, yy, xx, cx, cy - 0.45 * r, 0.95 * r, 0.7 * r, hair, k + 1,
                           clip_to=owner == k + 1)

    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return _labels_from_owner(image, owner, xs, ys, head_r)


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
                 transform=None):
        self.num_images, self.split, self.spec, self.transform = num_images, split, spec, transform

    def __len__(self) -> int:
        return self.num_images

    def point_counts(self) -> list[int]:
        """The number of people of every image (renders them; no augmentation)."""
        return [len(render_crowd(self.spec, self.split, i)["points"]) for i in range(self.num_images)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        raw = render_crowd(self.spec, self.split, index)
        h, w = raw["instance_map"].shape
        sample = {
            "image": torch.from_numpy(raw["image"]).permute(2, 0, 1).float().div_(255.0),
            "points": torch.from_numpy(raw["points"]),
            "boxes": torch.from_numpy(raw["boxes"]),
            "head_boxes": torch.from_numpy(raw["head_boxes"]),
            "instance_map": torch.from_numpy(raw["instance_map"]).long(),
            "meta": {"dataset": "synthetic", "name": f"{self.split}_{index:05d}.png",
                     "orig_size": (h, w), "scale": 1.0},
        }
        return self.transform(sample) if self.transform is not None else sample
