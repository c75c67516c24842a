"""Training and evaluation transforms that move image, points, boxes and instance masks together.

Each transform takes a raw sample (datamodules/loading.py: numpy, as read from the files or the
cache) or a contract sample (tensors, e.g. from the synthetic crowd) and returns a contract sample.

Training (`TrainTransform`), in this order:
1. random scale + crop (`scale_crop`): the crop window is cut from the source first and only then
   resampled, so a multi-megapixel image (or a memory-mapped cache entry) is never resized whole.
   Pixel centres map to pixel centres (p' = s (p + 0.5) - 0.5 - offset). The instance map is
   resampled nearest-neighbour, and a point that was inside its own mask keeps its pixel (tiny
   instances can otherwise vanish). Points that leave the crop are dropped with their boxes and
   attributes, and the instance map is renumbered so that id k + 1 is still point k (pixels of a
   dropped point's instance become background);
2. horizontal flip (albumentations, keypoints for the points and box corners, mask for the ids);
3. photometric: "none", "weak" (mild colour jitter) or "strong" (XMask's student view: colour jitter
   0.4/0.4/0.4/0.1 p=.8, grayscale p=.25, Gaussian blur sigma 0.1-2 p=.8), plus an optional cutout.

`TwoViewTransform` returns a weak and a strong view of the *same* crop and flip (teacher-student
training): `image` is the weak view, `image_strong` the strong one and `cutout` (H, W) bool marks
the erased rectangle of the strong view. `EvalTransform` keeps the whole image and zero-pads it at
the right and bottom to a multiple of 32 (`meta["valid_size"]` is the unpadded (H, W)).

Randomness: a sample loaded inside `datamodules.resumable.sample_key(epoch, index)` (what the
training loaders do) draws from a generator seeded by (`seed`, loader, epoch, index) alone, so its
augmentation does not depend on workers, prefetching or where a killed run resumed. Outside such a
context each process (DataLoader worker) seeds its generator the first time it runs from (`seed`,
`torch.initial_seed()`, worker id): workers and epochs differ, and runs seeded with Lightning's
`seed_everything` repeat.
"""
from __future__ import annotations

import math
import os
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.loading import RawSample, box_keys, own_pixel, stamp_point_pixels, to_sample
from datamodules.resumable import current_sample_key

PHOTOMETRIC = ("none", "weak", "strong")


# ----------------------------------------------------------------------------------------------
# raw <-> contract conversion

def as_raw(sample: dict) -> RawSample:
    """A raw (numpy) sample from a contract sample; raw samples pass through unchanged."""
    image = sample["image"]
    if not isinstance(image, torch.Tensor):
        return sample
    raw: RawSample = {"image": (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()}
    for key, value in sample.items():
        if key == "image":
            continue
        if isinstance(value, torch.Tensor):
            raw[key] = value.numpy()
        elif key == "point_attrs" and value is not None:
            raw[key] = {k: v.numpy() for k, v in value.items()}
        else:
            raw[key] = value
    raw.setdefault("point_attrs", {})
    im = raw.get("instance_map")
    if im is not None:
        raw["instance_map"] = im.astype(np.int32)
    raw["meta"] = dict(raw.get("meta") or {})
    return raw


def _per_point_box_keys(raw: RawSample) -> list[str]:
    return [k for k in box_keys(raw) if k != "ignore_boxes"]


# ----------------------------------------------------------------------------------------------
# geometry

def keep_points(raw: RawSample, keep: np.ndarray) -> RawSample:
    """Keep points `keep` (bool (N,) or sorted indices) with their boxes and attributes, and
    renumber the instance map so id k + 1 stays the instance of point k (dropped ids -> 0)."""
    keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
    out = dict(raw)
    n = len(raw["points"])
    out["points"] = raw["points"][keep]
    for key in _per_point_box_keys(raw):
        out[key] = raw[key][keep]
    out["point_attrs"] = {k: v[keep] for k, v in (raw.get("point_attrs") or {}).items()}
    if raw.get("instance_map") is not None:
        remap = np.zeros(max(n, int(raw["instance_map"].max(initial=0))) + 1, np.int32)
        remap[keep + 1] = np.arange(1, len(keep) + 1, dtype=np.int32)
        out["instance_map"] = remap[raw["instance_map"]]
    return out


def scale_crop(raw: RawSample, scale: float, top: int, left: int, height: int, width: int) -> RawSample:
    """Resample the window of the image scaled by `scale` whose top-left is (top, left) in scaled
    pixels, of size (height, width). Points outside the window are dropped (with their boxes,
    attributes and instance ids); boxes are clipped; the output image has 3 channels."""
    src = raw["image"]
    h, w = src.shape[:2]
    s = float(scale)
    # source pixel-index range of the output window, with one pixel of margin for interpolation
    x_lo = max(int(math.floor((left + 0.5) / s - 0.5)) - 1, 0)
    x_hi = min(int(math.ceil((left + width - 0.5) / s - 0.5)) + 2, w)
    y_lo = max(int(math.floor((top + 0.5) / s - 0.5)) - 1, 0)
    y_hi = min(int(math.ceil((top + height - 0.5) / s - 0.5)) + 2, h)
    window = np.ascontiguousarray(src[y_lo:y_hi, x_lo:x_hi])
    tx, ty = s * (x_lo + 0.5) - 0.5 - left, s * (y_lo + 0.5) - 0.5 - top
    if s == 1.0 and tx == round(tx) and ty == round(ty):
        image = window[int(-ty):int(-ty) + height, int(-tx):int(-tx) + width]
    else:
        matrix = np.array([[s, 0, tx], [0, s, ty]], np.float64)
        image = cv2.warpAffine(window, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    image = image.reshape(height, width, -1)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)

    out = dict(raw)
    out["image"] = np.ascontiguousarray(image)
    shift = np.array([left, top], np.float32)

    def move(p: np.ndarray) -> np.ndarray:
        return (s * (p.reshape(-1, 2) + 0.5) - 0.5 - shift).astype(np.float32)

    points = move(raw["points"])
    if raw.get("instance_map") is not None:
        rows = np.clip(np.round((np.arange(height) + top + 0.5) / s - 0.5), 0, h - 1).astype(np.int64)
        cols = np.clip(np.round((np.arange(width) + left + 0.5) / s - 0.5), 0, w - 1).astype(np.int64)
        id_map = np.asarray(raw["instance_map"])[rows[:, None], cols[None, :]].astype(np.int32)
        out["instance_map"] = stamp_point_pixels(id_map, points, own_pixel(raw["instance_map"], raw["points"]))
    limit = np.array([width - 1, height - 1], np.float32)
    for key in box_keys(raw):
        out[key] = np.clip(move(raw[key]), 0, limit).reshape(-1, 4)
    if raw.get("ignore_boxes") is not None:
        moved = move(raw["ignore_boxes"]).reshape(-1, 4)
        visible = (moved[:, 2] >= 0) & (moved[:, 0] <= limit[0]) & (moved[:, 3] >= 0) & (moved[:, 1] <= limit[1])
        out["ignore_boxes"] = out["ignore_boxes"][visible]
    out["points"] = points
    inside = ((points[:, 0] >= -0.5) & (points[:, 0] < width - 0.5)
              & (points[:, 1] >= -0.5) & (points[:, 1] < height - 0.5))
    out["meta"] = {**raw["meta"], "scale": raw["meta"].get("scale", 1.0) * s,
                   "crop": (int(top), int(left), int(height), int(width), s)}
    return keep_points(out, inside)


def random_scale_crop(raw: RawSample, rng: np.random.Generator, crop_size: int | None,
                      scale_range: tuple[float, float]) -> RawSample:
    """A random scale in `scale_range`, then a random crop of at most crop_size x crop_size."""
    h, w = raw["image"].shape[:2]
    s = float(rng.uniform(*scale_range)) if scale_range[0] != scale_range[1] else float(scale_range[0])
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    ch, cw = (sh, sw) if crop_size is None else (min(crop_size, sh), min(crop_size, sw))
    top, left = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    return scale_crop(raw, s, top, left, ch, cw)


def _flip(raw: RawSample, compose: A.Compose) -> RawSample:
    """Apply an albumentations geometric compose to image, mask, points and box corners."""
    keys = _per_point_box_keys(raw) + (["ignore_boxes"] if raw.get("ignore_boxes") is not None else [])
    parts = [raw["points"].reshape(-1, 2)] + [raw[k].reshape(-1, 2) for k in keys]
    keypoints = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 2), np.float32)
    data: dict[str, Any] = {"image": raw["image"], "keypoints": keypoints}
    if raw.get("instance_map") is not None:
        data["mask"] = raw["instance_map"]
    res = compose(**data)
    out = dict(raw)
    out["image"] = res["image"]
    if "mask" in res:
        out["instance_map"] = np.ascontiguousarray(res["mask"])
    kp = np.asarray(res["keypoints"], np.float32).reshape(-1, 2)
    n = len(raw["points"])
    out["points"] = kp[:n]
    start = n
    for k in keys:
        m = len(raw[k]) * 2
        corners = kp[start:start + m].reshape(-1, 4)
        out[k] = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1)
        start += m
    return out


def cutout(image: np.ndarray, rng: np.random.Generator, fraction: tuple[float, float] = (1 / 8, 1 / 4)) -> tuple[np.ndarray, np.ndarray]:
    """Erase one random rectangle (each side a `fraction` of the image's) to zero.
    Returns the image and the (H, W) bool mask of erased pixels."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(*fraction)), int(w * rng.uniform(*fraction))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    erased = np.zeros((h, w), bool)
    erased[top:top + ch, left:left + cw] = True
    image = image.copy()
    image[erased] = 0
    return image, erased


def photometric_compose(kind: str) -> A.Compose | None:
    if kind not in PHOTOMETRIC:
        raise ValueError(f"photometric must be one of {PHOTOMETRIC}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "weak":
        return A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.5)])
    return A.Compose([A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
                      A.ToGray(p=0.25), A.GaussianBlur(sigma_limit=(0.1, 2.0), p=0.8)])


# ----------------------------------------------------------------------------------------------
# transforms

class _Seeded:
    """A numpy generator (and albumentations composes) seeded per sample key (`sample_key`), else
    once per process."""

    def __init__(self, seed: int | None):
        self.seed = seed
        self._pid: int | None = None
        self._rng: np.random.Generator | None = None
        self._key: object = None

    def _composes(self) -> list[A.Compose]:
        return []

    @property
    def rng(self) -> np.random.Generator:
        key = current_sample_key()
        if key is not None:
            if self._key is not key:  # a new sample: (seed, stream, epoch, index) alone decide its draws
                self._rng = np.random.default_rng([self.seed or 0, *key.entropy()])
                self._key, self._pid = key, None
                for compose in self._composes():
                    compose.set_random_seed(int(self._rng.integers(2 ** 31)))
            return self._rng
        if self._rng is None or self._pid != os.getpid():
            self._key = None
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            # torch.initial_seed() differs per worker and per epoch of non-persistent workers
            self._rng = np.random.default_rng([self.seed or 0, torch.initial_seed() % (2 ** 63), worker])
            self._pid = os.getpid()
            for compose in self._composes():
                compose.set_random_seed(int(self._rng.integers(2 ** 31)))
        return self._rng

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rng"], state["_pid"], state["_key"] = None, None, None
        return state


class TrainTransform(_Seeded):
    """Random scale + crop, horizontal flip and photometric jitter (see the module docstring).

    crop_size: side of the square crop (None: the whole scaled image); scale_range: random scale;
    hflip: flip probability; photometric: none | weak | strong; cutout: erase a rectangle.
    """

    def __init__(self, crop_size: int | None = 256, scale_range: tuple[float, float] = (0.7, 1.3), hflip: float = 0.5,
                 photometric: str = "none", cutout: bool = False, seed: int | None = None):
        super().__init__(seed)
        self.crop_size, self.scale_range, self.use_cutout = crop_size, tuple(scale_range), cutout
        self.geometric = A.Compose([A.HorizontalFlip(p=hflip)],
                                   keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
        self.photometric = photometric_compose(photometric)

    def _composes(self) -> list[A.Compose]:
        return [c for c in (self.geometric, self.photometric) if c is not None]

    def geometry(self, sample: dict) -> RawSample:
        raw = as_raw(sample)
        raw = random_scale_crop(raw, self.rng, self.crop_size, self.scale_range)
        return _flip(raw, self.geometric)

    def __call__(self, sample: dict) -> dict:
        raw = self.geometry(sample)
        if self.photometric is not None:
            raw["image"] = self.photometric(image=raw["image"])["image"]
        if self.use_cutout:
            raw["image"], raw["cutout"] = cutout(raw["image"], self.rng)
        return to_sample(raw)


class TwoViewTransform(TrainTransform):
    """A weak and a strong view of the same crop: `image` (weak), `image_strong`, `cutout` (H, W) bool."""

    def __init__(self, crop_size: int | None = 256, scale_range: tuple[float, float] = (0.7, 1.3), hflip: float = 0.5,
                 weak: str = "none", strong: str = "strong", cutout: bool = True, seed: int | None = None):
        super().__init__(crop_size, scale_range, hflip, weak, cutout=False, seed=seed)
        self.strong = photometric_compose(strong)
        self.strong_cutout = cutout

    def _composes(self) -> list[A.Compose]:
        return super()._composes() + ([self.strong] if self.strong is not None else [])

    def __call__(self, sample: dict) -> dict:
        raw = self.geometry(sample)
        weak = raw["image"]
        strong = self.strong(image=weak)["image"] if self.strong is not None else weak.copy()
        if self.photometric is not None:
            weak = self.photometric(image=weak)["image"]
        erased = np.zeros(weak.shape[:2], bool)
        if self.strong_cutout:
            strong, erased = cutout(strong, self.rng)
        out = to_sample({**raw, "image": weak})
        out["image_strong"] = to_sample({"image": strong, "points": np.zeros((0, 2), np.float32), "meta": {}})["image"]
        out["cutout"] = torch.from_numpy(erased)
        return out


class EvalTransform:
    """The whole image, zero-padded at the right and bottom to a multiple of `pad_multiple`."""

    def __init__(self, pad_multiple: int = 32):
        self.pad_multiple = pad_multiple

    def __call__(self, sample: dict) -> dict:
        out = to_sample(sample) if not isinstance(sample["image"], torch.Tensor) else dict(sample)
        return pad_sample(out, self.pad_multiple)


def pad_sample(sample: dict, multiple: int = 32) -> dict:
    """Zero-pad image (and instance map) at the right/bottom so H and W are multiples of `multiple`."""
    _, h, w = sample["image"].shape
    ph, pw = -h % multiple, -w % multiple
    out = dict(sample)
    out["meta"] = {**sample.get("meta", {}), "valid_size": (int(h), int(w))}
    if ph or pw:
        out["image"] = F.pad(sample["image"], (0, pw, 0, ph))
        if sample.get("instance_map") is not None:
            out["instance_map"] = F.pad(sample["instance_map"], (0, pw, 0, ph))
        if sample.get("cutout") is not None:
            out["cutout"] = F.pad(sample["cutout"], (0, pw, 0, ph))
    return out


def collate_two_views(samples: list[dict]) -> dict:
    """`types.collate_samples`, with `image_strong` and `cutout` zero-padded like `image`."""
    from datamodules.types import collate_samples

    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)
    padded = []
    for s in samples:
        s = dict(s)
        for key in ("image_strong", "cutout"):
            if key in s:
                v = s[key]
                s[key] = F.pad(v, (0, w - v.shape[-1], 0, h - v.shape[-2]))
        padded.append(s)
    return collate_samples(padded)
