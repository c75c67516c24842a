"""Exclusive instance maps: pixels claimed by several instances, empty instances, point pixels.

Instances claim pixels (inside their circle, where their chosen SAM logit is above threshold)
with a priority; a canvas keeps, per pixel, the highest priority seen and its instance id, so
claims can arrive in any number of chunks and tiles (`claim_pixels`). Priorities:
- `logit` (default): the instance's SAM logit at that pixel (the most confident mask wins);
- `nearest`: minus the squared distance to the instance's point (a Voronoi split).
Ties go to the later claim (processing order: tiles in raster order, chunks by radius).

`finalize_instances` then, in this order:
1. finds instances that own no pixel ("empty": SAM gave nothing inside the circle, or everything
   was taken by neighbours) and gives each a fallback disc of radius
   max(fallback_radius_factor * r_i, 1) on pixels that are still background (fallback discs
   split their own overlaps by nearest centre);
2. gives every point its own pixel (round(y), round(x)), whoever held it. Two points on one
   pixel (duplicate annotations) cannot both have it: the lower index keeps it, and the other is
   reported in `shared_pixel_points` (it may then hold its fallback pixels only, or nothing:
   `missing_instances`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crowdseg.geometry import point_pixels


def new_canvas(num_pixels: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(priority (P,) float32 = -inf, owner (P,) int32 = 0) for an image of P pixels."""
    return (torch.full((num_pixels,), -torch.inf, device=device),
            torch.zeros(num_pixels, dtype=torch.int32, device=device))


def claim_pixels(best: torch.Tensor, owner: torch.Tensor, flat: torch.Tensor, priority: torch.Tensor,
                 ids: torch.Tensor) -> None:
    """In place: each pixel of `flat` (M,) goes to the id (M,) with the highest priority (M,) so far."""
    if flat.numel() == 0:
        return
    priority = priority.to(best.dtype)
    best.scatter_reduce_(0, flat, priority, reduce="amax")
    win = priority >= best[flat]
    owner[flat[win]] = ids[win].to(owner.dtype)


def resolve_overlaps(flat: torch.Tensor, priority: torch.Tensor, ids: torch.Tensor,
                     num_pixels: int) -> torch.Tensor:
    """Owner (P,) int32 of every pixel from claims (flat pixel index, priority, id >= 1); 0 = nobody."""
    best, owner = new_canvas(num_pixels, flat.device)
    claim_pixels(best, owner, flat, priority, ids)
    return owner


def disc_claims(points: np.ndarray, radii: np.ndarray, ids: np.ndarray, image_hw: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Claims of full discs (flat pixel index, -squared distance, id) for points (M, 2), radii (M,)."""
    h, w = image_hw
    flats, prios, owners = [], [], []
    centre_rows, centre_cols = point_pixels(points)
    for (x, y), r, i, cy, cx in zip(points, radii, ids, centre_rows, centre_cols):
        big = int(np.ceil(r))
        rows, cols = np.mgrid[cy - big:cy + big + 1, cx - big:cx + big + 1]
        d2 = (cols - x) ** 2 + (rows - y) ** 2
        keep = (d2 <= r * r) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        flats.append(rows[keep] * w + cols[keep])
        prios.append(-d2[keep])
        owners.append(np.full(int(keep.sum()), i, np.int64))
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(prios), np.concatenate(owners)


def finalize_instances(owner: np.ndarray, points: np.ndarray, radii: np.ndarray,
                       fallback_radius_factor: float = 0.5) -> tuple[np.ndarray, dict[str, Any]]:
    """Fallback discs for empty instances and point pixels; see the module docstring.

    owner: (H, W) int, 0 background, k the instance of point k-1 (modified copy is returned);
    points: (N, 2) xy; radii: (N,). Returns the id map (H, W) (uint16 when N < 65536, else int32)
    and counts: empty_fallbacks, fallback_ids, shared_pixel_points, missing_instances.
    """
    h, w = owner.shape
    n = len(points)
    owner = owner.astype(np.int32, copy=True)
    counts = np.bincount(owner.ravel(), minlength=n + 1)[1:n + 1]
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        fr = np.maximum(fallback_radius_factor * radii[empty], 1.0)
        flat, prio, ids = disc_claims(points[empty], fr, empty + 1, (h, w))
        free = owner.ravel()[flat] == 0
        fill = resolve_overlaps(torch.from_numpy(flat[free]), torch.from_numpy(prio[free]).float(),
                                torch.from_numpy(ids[free]), h * w).numpy().reshape(h, w)
        owner = np.where((owner == 0) & (fill > 0), fill, owner)

    rows, cols = point_pixels(points, h, w)
    flat = rows * w + cols
    _, first = np.unique(flat, return_index=True)      # lowest point index on each point pixel
    owner.ravel()[flat[first]] = first + 1
    shared = int(np.sum(owner[rows, cols] != np.arange(1, n + 1)))
    final = np.bincount(owner.ravel(), minlength=n + 1)[1:n + 1]
    id_map = owner.astype(np.uint16 if n < 65536 else np.int32)
    return id_map, {
        "empty_fallbacks": int(len(empty)),
        "fallback_ids": (empty + 1).tolist(),
        "shared_pixel_points": shared,
        "missing_instances": int(np.sum(final == 0)),
    }
