"""The data contract shared by every reader, transform, DataModule and model.

A *sample* is a plain dict:

- ``image``: (3, H, W) float32 tensor, RGB in [0, 1] (models normalise internally).
- ``points``: (N, 2) float32 tensor, xy in 0-based *pixel-index* coordinates of ``image``: the
  centre of the pixel at row i, column j is (x=j, y=i), so the pixel holding a point is
  (round(y), round(x)) (see `crowdseg.geometry.point_pixels`). This is SAM's convention too.
  Readers of MATLAB annotations (1-based) subtract 1.
- ``boxes`` (optional): (N, 4) float32 xyxy in pixels, row k belongs to point k.
- ``instance_map`` (optional): (H, W) int64, 0 background, k the instance of point k-1.
- ``meta``: dict with ``dataset`` (str), ``name`` (file name), ``orig_size`` (H, W) of the file,
  ``scale`` (float, image pixels per original pixel).

A *batch* (see `collate_samples`) stacks images (zero-padded to the largest H, W in the batch)
and keeps per-image lists for everything whose length varies.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crowdseg.geometry import point_pixels  # noqa: F401  (the one point-to-pixel rule, re-exported)

Sample = dict[str, Any]
Batch = dict[str, Any]


def collate_samples(samples: list[Sample]) -> Batch:
    """Collate samples into a batch.

    Returns ``image`` (B, 3, Hmax, Wmax) zero-padded at the right/bottom, ``image_size`` (B, 2)
    long (H, W) of each unpadded image, ``points`` list of (N_b, 2), ``boxes`` list or None,
    ``instance_map`` list of (H_b, W_b) or None, ``meta`` list of dicts. Extra tensor keys with equal
    shapes are stacked (except per-point keys ending in "boxes" or "points"); anything else is kept
    as a list.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    heights = [s["image"].shape[-2] for s in samples]
    widths = [s["image"].shape[-1] for s in samples]
    h, w = max(heights), max(widths)
    images = torch.stack([F.pad(s["image"], (0, w - s["image"].shape[-1], 0, h - s["image"].shape[-2]))
                          for s in samples])
    batch: Batch = {
        "image": images,
        "image_size": torch.tensor([[hh, ww] for hh, ww in zip(heights, widths)], dtype=torch.long),
        "points": [s["points"] for s in samples],
        "boxes": [s["boxes"] for s in samples] if all("boxes" in s and s["boxes"] is not None for s in samples) else None,
        "instance_map": ([s["instance_map"] for s in samples]
                         if all(s.get("instance_map") is not None for s in samples) else None),
        "meta": [s.get("meta", {}) for s in samples],
    }
    for key in samples[0]:
        if key in batch or key in ("boxes", "instance_map"):
            continue
        values = [s[key] for s in samples]
        # per-point labels (head_boxes, ...) stay lists even when two images happen to have equal counts
        per_point = key.endswith("boxes") or key.endswith("points")
        if not per_point and all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def empty_points() -> torch.Tensor:
    return torch.zeros((0, 2), dtype=torch.float32)


