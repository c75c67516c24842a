"""Nearest Neighbor Exclusive Circles (NNEC): one circle per annotated point.

r_i = clamp(radius_factor * min_{j != i} |p_i - p_j|, r_min, r_max)

With radius_factor 1.0 (the default, as in the XMask code of the same group) the disc of p_i is
the largest disc centred on p_i whose interior holds no other annotated head; discs of neighbours
overlap and the overlap is resolved later (`resolve.py`). radius_factor 0.5 gives pairwise
disjoint circles (up to the r_min clamp).

Rules (our choices, see docs/dpmo.md):
- a lone point (the only point of the image) gets `lone_radius`, default min(H, W) / 4 (XMask's
  pseudo-mask rule), clamped to [r_min, r_max] and *not* multiplied by radius_factor;
- r_max defaults to min(H, W) / 2 (XMask's clamp);
- duplicate points (distance 0) get r_min.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.spatial import cKDTree


def nearest_neighbour_distances(points: np.ndarray) -> np.ndarray:
    """(N,) distance of each point (N, 2) to its nearest other point; inf when N < 2."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if len(points) < 2:
        return np.full(len(points), np.inf)
    dist, _ = cKDTree(points).query(points, k=2)
    return dist[:, 1]


def nnec_radii(points: np.ndarray, image_hw: tuple[int, int], radius_factor: float = 1.0,
               r_min: float = 3.0, r_max: Optional[float] = None,
               lone_radius: Optional[float] = None) -> np.ndarray:
    """NNEC radius of each point.

    points: (N, 2) float, xy in pixels; image_hw: (H, W) of the image.
    Returns (N,) float64 radii in pixels.
    """
    h, w = image_hw
    r_max = min(h, w) / 2.0 if r_max is None else float(r_max)
    lone = min(h, w) / 4.0 if lone_radius is None else float(lone_radius)
    if r_max < r_min:
        raise ValueError(f"r_max {r_max} < r_min {r_min}")
    dist = nearest_neighbour_distances(points)
    radii = np.where(np.isfinite(dist), radius_factor * dist, lone)
    return np.clip(radii, r_min, r_max)


def nearest_neighbours(points: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of the k nearest *other* points, nearest first; -1 where fewer exist."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(points)
    out = np.full((n, max(k, 0)), -1, np.int64)
    if n < 2 or k < 1:
        return out
    kk = min(k + 1, n)
    _, idx = cKDTree(points).query(points, k=kk)
    idx = idx.reshape(n, kk)
    # Drop each point itself (usually column 0, but not with duplicates: remove by identity).
    own = idx == np.arange(n)[:, None]
    own[~own.any(1), -1] = True     # a duplicate displaced the point itself: drop the farthest instead
    others = idx[~own].reshape(n, kk - 1)
    out[:, :kk - 1] = others[:, :k]
    return out
