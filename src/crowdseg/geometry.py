"""Points to pixels: the one place that turns float point coordinates into pixel indices.

The data contract (datamodules/types.py): a point (x, y) in pixels lies in the pixel
(row, col) = (round(y), round(x)); pixel k covers [k - 0.5, k + 0.5). Rounding is numpy's and
torch's (halves to even), the same for arrays and tensors. Everything that indexes an image, an id
map or a canvas at a point goes through `point_pixels`: DPMO and the RPS environment (tile
ownership, circle grids, point pixels of the final id map), the mask-counting losses, the
Lightning modules' "inside the image" test and the datamodules' resampling of id maps.

A leaf module (numpy and torch only), so `datamodules` may import it.
"""
from __future__ import annotations

from typing import Optional, TypeVar

import numpy as np
import torch

Index = TypeVar("Index", np.ndarray, torch.Tensor)


def point_pixels(points: Index, height: Optional[int] = None, width: Optional[int] = None) -> tuple[Index, Index]:
    """(rows, cols) of the pixels holding `points` (..., 2) xy.

    A tensor gives long tensors on its device, anything else int64 numpy arrays. With `height` and
    `width` the indices are clamped into an (height, width) image (a point outside it maps to the
    nearest border pixel); without them they are returned as rounded (use `pixels_inside`).
    """
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither")
    if isinstance(points, torch.Tensor):
        p = points.detach()
        cols, rows = p[..., 0].round().long(), p[..., 1].round().long()
        if height is not None:
            cols, rows = cols.clamp(0, width - 1), rows.clamp(0, height - 1)
        return rows, cols
    p = np.asarray(points)
    cols, rows = np.round(p[..., 0]).astype(np.int64), np.round(p[..., 1]).astype(np.int64)
    if height is not None:
        cols, rows = np.clip(cols, 0, width - 1), np.clip(rows, 0, height - 1)
    return rows, cols


def pixels_inside(rows: Index, cols: Index, height: int, width: int) -> Index:
    """Bool mask (same shape) of the pixel indices that lie in an (height, width) image."""
    return (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)


def points_inside(points: Index, height: int, width: int) -> Index:
    """Bool mask (...,) of the points (..., 2) xy whose pixel lies in an (height, width) image."""
    return pixels_inside(*point_pixels(points), height, width)
