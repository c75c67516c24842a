"""Detection-style resizing (BoxInst / detectron2): a short side, a long-side cap, a flip.

- `ShortSideTrainTransform`: the short side drawn uniformly from [short_min, short_max] (integer
  pixels), the long side at most `max_size`, then a horizontal flip and optional photometric jitter;
  the whole image, no crop. Boxes, points and the instance map move with the image
  (`transforms.scale_crop`), boxes are clipped to the image.
- `ShortSideEvalTransform`: the short side `short_side` (long side <= `max_size`), zero-padded to a
  multiple of `pad_multiple`. The instance map at the *original* resolution stays in
  `orig_instance_map` (evaluation compares masks there, as COCO evaluation does); `meta["scale"]` is
  the resize factor and `meta["valid_size"]` the resized (H, W) inside the padding.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from datamodules.loading import to_sample
from datamodules.transforms import TrainTransform, _flip, as_raw, pad_sample, scale_crop


def short_side_scale(height: int, width: int, short_side: float, max_size: Optional[float]) -> float:
    """The factor that makes the short side `short_side`, reduced so the long side stays <= `max_size`."""
    scale = float(short_side) / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = float(max_size) / max(height, width)
    return scale


def _resize_whole(raw: dict, scale: float) -> dict:
    h, w = raw["image"].shape[:2]
    return scale_crop(raw, scale, 0, 0, max(1, round(h * scale)), max(1, round(w * scale)))


class ShortSideTrainTransform(TrainTransform):
    """Random short side in `short_sides` = (min, max), long side <= max_size, flip, photometric."""

    def __init__(self, short_sides: Sequence[int] = (384, 480), max_size: Optional[int] = 1333, hflip: float = 0.5,
                 photometric: str = "none", seed: Optional[int] = None):
        super().__init__(crop_size=None, scale_range=(1.0, 1.0), hflip=hflip, photometric=photometric, seed=seed)
        lo, hi = (int(short_sides[0]), int(short_sides[-1]))
        if not 0 < lo <= hi:
            raise ValueError(f"short sides must be 0 < min <= max, got {list(short_sides)}")
        self.short_sides, self.max_size = (lo, hi), max_size

    def geometry(self, sample: dict) -> dict:
        raw = as_raw(sample)
        h, w = raw["image"].shape[:2]
        short = int(self.rng.integers(self.short_sides[0], self.short_sides[1] + 1))
        raw = _resize_whole(raw, short_side_scale(h, w, short, self.max_size))
        return _flip(raw, self.geometric)


class ShortSideEvalTransform:
    """Resize to `short_side` (None: keep the size), long side <= max_size, pad to `pad_multiple`."""

    def __init__(self, short_side: Optional[int] = 480, max_size: Optional[int] = 1333, pad_multiple: int = 32):
        self.short_side, self.max_size, self.pad_multiple = short_side, max_size, pad_multiple

    def __call__(self, sample: dict) -> dict:
        raw = as_raw(sample)
        h, w = raw["image"].shape[:2]
        scale = 1.0 if self.short_side is None else short_side_scale(h, w, self.short_side, self.max_size)
        original = raw.get("instance_map")
        if scale != 1.0:
            raw = _resize_whole(raw, scale)
        out = to_sample(raw)
        if scale != 1.0 and original is not None:
            out["orig_instance_map"] = torch.from_numpy(original.astype("int64"))
        return pad_sample(out, self.pad_multiple)
