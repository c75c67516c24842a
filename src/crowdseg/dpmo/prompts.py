"""SAM prompts for a chunk of points of one tile, and the decode windows they need.

Per point i (our reconstruction of DPMO's prompting, docs/dpmo.md):
- a positive point at p_i (label 1);
- negative points at its k nearest annotated neighbours (label 0), the heads its mask must not
  take. A neighbour outside the tile's context, or closer than `min_negative_distance` pixels to
  p_i (a duplicate annotation), is replaced by padding (label -1, SAM's "not a point"), so every
  prompt has the same length 1 + k;
- optionally the bounding box of its NNEC circle as a box prompt.
EDP-SAM adds a dense prompt, `exclusion_mask_prompt`: SAM's mask input holding the candidate
logits inside the circle and a large negative logit outside it.

Frames (see crowdseg/sam/predictor.py): image pixel x of a tile with context origin x0 and scale sx
sits at input position X = (x - x0 + 0.5) * sx (pixel centres; SAM is given X - 0.5). Windows are
counted in embedding cells of `patch` input pixels; a window of `cells` cells is 4 * cells low-res
pixels wide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from crowdseg.dpmo.tiles import Tile
from crowdseg.geometry import point_pixels


@dataclass
class Prompts:
    coords: torch.Tensor            # (B, 1 + k, 2) float, xy in the input frame (minus 0.5)
    labels: torch.Tensor            # (B, 1 + k) long: 1 positive, 0 negative, -1 padding
    boxes: Optional[torch.Tensor]   # (B, 4) xyxy in the input frame, or None
    origins: torch.Tensor           # (B, 2) long, (row, col) of each window's first embedding cell
    cells: int                      # window side in embedding cells


def to_input(xy: np.ndarray, tile: Tile) -> np.ndarray:
    """Continuous input-frame position of image coordinates `xy` (..., 2) in `tile`."""
    sx, sy = tile.scale_xy
    x0, y0 = tile.context[:2]
    return np.stack([(xy[..., 0] - x0 + 0.5) * sx, (xy[..., 1] - y0 + 0.5) * sy], -1)


def build_prompts(points: np.ndarray, radii: np.ndarray, neighbours: np.ndarray, index: np.ndarray,
                  tile: Tile, patch: int, embed_size: int, context_factor: float = 2.0,
                  box_prompt: bool = False, min_negative_distance: float = 1.0) -> Prompts:
    """Prompts and decode windows for the points `index` (B,) of `points` (N, 2) owned by `tile`.

    radii: (N,) NNEC radii; neighbours: (N, k) indices of the nearest other points (-1 = none).
    """
    p = points[index]                                   # (B, 2)
    r = radii[index]                                    # (B,)
    nb = neighbours[index]                              # (B, k)
    b, k = nb.shape
    x0, y0, x1, y1 = tile.context

    neg = points[np.clip(nb, 0, None)]                  # (B, k, 2)
    usable = (nb >= 0) & (neg[..., 0] >= x0 - 0.5) & (neg[..., 0] < x1 - 0.5) \
        & (neg[..., 1] >= y0 - 0.5) & (neg[..., 1] < y1 - 0.5) \
        & (np.linalg.norm(neg - p[:, None], axis=-1) >= min_negative_distance)
    coords = to_input(np.concatenate([p[:, None], neg], 1), tile) - 0.5
    coords[:, 1:][~usable] = 0.0
    labels = np.concatenate([np.ones((b, 1), np.int64), np.where(usable, 0, -1)], 1)

    boxes = None
    if box_prompt:
        lo = to_input(p - r[:, None], tile) - 0.5
        hi = to_input(p + r[:, None], tile) - 0.5
        boxes = torch.from_numpy(np.concatenate([lo, hi], 1)).float()

    origins, cells = decode_windows(p, r, tile, patch, embed_size, context_factor)
    return Prompts(torch.from_numpy(coords).float(), torch.from_numpy(labels), boxes, origins, cells)


def decode_windows(p: np.ndarray, r: np.ndarray, tile: Tile, patch: int, embed_size: int,
                   context_factor: float) -> tuple[torch.Tensor, int]:
    """Windows of embedding cells covering each circle grown `context_factor` times.

    p: (B, 2) xy; r: (B,). Returns origins (B, 2) long (row, col) and the common side in cells.
    """
    sx, sy = tile.scale_xy
    centre = to_input(p, tile)                                          # (B, 2)
    half = context_factor * r[:, None] * np.array([sx, sy])             # (B, 2) input pixels
    start = np.floor((centre - half) / patch).astype(np.int64)
    stop = np.ceil((centre + half) / patch).astype(np.int64)
    cells = int(min(max(int((stop - start).max()), 1), embed_size))
    origins = np.clip(start, 0, embed_size - cells)[:, ::-1].copy()    # (row, col)
    return torch.from_numpy(origins), cells


def exclusion_mask_prompt(inside: torch.Tensor, origins: torch.Tensor, low_res: int, magnitude: float,
                          window_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EDP-SAM's dense prompt: (B, 1, L, L) logits, -magnitude everywhere except inside the circle.

    inside: (B, S, S) bool, low-res window cells inside each circle; origins: (B, 2) embedding cells.
    Inside the circle the prompt is `window_logits` (B, S, S) clamped to +-magnitude (the refine
    pass), or +magnitude when None (the pure circle).
    """
    b, s, _ = inside.shape
    device = inside.device
    values = torch.full((b, s, s), float(magnitude), device=device) if window_logits is None \
        else window_logits.float().clamp(-magnitude, magnitude)       # float32 also under autocast
    values = torch.where(inside, values, torch.full_like(values, -magnitude))
    prompt = torch.full((b, 1, low_res, low_res), -float(magnitude), device=device)
    start = origins.to(device) * 4
    offsets = torch.arange(s, device=device)
    rows = (start[:, 0:1] + offsets)[:, :, None]
    cols = (start[:, 1:2] + offsets)[:, None, :]
    prompt[torch.arange(b, device=device)[:, None, None], 0, rows, cols] = values
    return prompt


def window_cells_geometry(p: torch.Tensor, r: torch.Tensor, tile: Tile, origins: torch.Tensor,
                          cells: int, patch: int = 16, context_factor: float = 2.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which low-res cells of each window lie inside the circle, and which count at all.

    p: (B, 2) xy; r: (B,). Returns inside (B, S, S) bool (cell centre in the circle) and valid
    (B, S, S) bool: inside the resized image and within `context_factor` radii of the point. The
    window itself is shared by a chunk and sized for its largest circle; `valid` makes what a
    prompt sees independent of its chunk. S = 4 * cells.
    """
    sx, sy = tile.scale_xy
    x0, y0 = tile.context[:2]
    rh, rw = tile.resized_hw
    s = 4 * cells
    offsets = torch.arange(s, device=p.device, dtype=torch.float64)
    start = origins.to(p.device, torch.float64) * 4
    step = patch / 4.0                                                      # input pixels per low-res pixel
    ys_in = step * (start[:, 0:1] + offsets + 0.5)                          # (B, S) input y of cell centres
    xs_in = step * (start[:, 1:2] + offsets + 0.5)
    ys = ys_in / sy - 0.5 + y0                                              # image coordinates
    xs = xs_in / sx - 0.5 + x0
    pd = p.to(torch.float64)
    d2 = (xs[:, None, :] - pd[:, 0, None, None]) ** 2 + (ys[:, :, None] - pd[:, 1, None, None]) ** 2
    r2 = (r.to(torch.float64) ** 2)[:, None, None]
    inside = d2 <= r2
    valid = (ys_in[:, :, None] < rh) & (xs_in[:, None, :] < rw) & (d2 <= context_factor ** 2 * r2)
    return inside, valid


@dataclass
class CirclePixels:
    flat: torch.Tensor      # (B, P, P) long, row * W + col of each grid pixel (clamped into the image)
    valid: torch.Tensor     # (B, P, P) bool: inside the circle, the image and the tile context
    grid: torch.Tensor      # (B, P, P, 2) float, grid_sample coordinates in each decode window
    dist2: torch.Tensor     # (B, P, P) float, squared distance to the point
    offsets: torch.Tensor   # (B, 2) long, (x0, y0) image pixel of grid cell (0, 0)


def circle_pixels(p: torch.Tensor, r: torch.Tensor, tile: Tile, image_hw: tuple[int, int],
                  origins: torch.Tensor, cells: int, patch: int = 16) -> CirclePixels:
    """The image pixels of each circle and where they fall in the decode windows.

    p: (B, 2) xy; r: (B,) radii. The grid is (2R + 1)^2 pixels around each point's pixel,
    R = ceil(max r), so one chunk shares one shape (chunks are sorted by radius).
    """
    h, w = image_hw
    sx, sy = tile.scale_xy
    x0, y0, x1, y1 = tile.context
    device = p.device
    big = int(math.ceil(float(r.max()))) if len(r) else 0
    offsets = torch.arange(-big, big + 1, device=device)
    centre_rows, centre_cols = point_pixels(p)                             # (B,) each, not clamped
    rows = (centre_rows[:, None] + offsets)[:, :, None]                    # (B, P, 1)
    cols = (centre_cols[:, None] + offsets)[:, None, :]                    # (B, 1, P)
    pd = p.to(torch.float64)
    dist2 = (cols - pd[:, 0, None, None]) ** 2 + (rows - pd[:, 1, None, None]) ** 2
    valid = (dist2 <= (r.to(torch.float64) ** 2)[:, None, None]) \
        & (rows >= max(y0, 0)) & (rows < min(y1, h)) & (cols >= max(x0, 0)) & (cols < min(x1, w))
    flat = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
    # grid_sample coordinates (align_corners=False): low-res pixel k covers [k, k + 1).
    s = 4.0 * cells
    start = origins.to(device, torch.float64) * 4
    step = patch / 4.0
    u = ((cols - x0 + 0.5) * sx / step - start[:, 1, None, None]) * (2.0 / s) - 1.0
    v = ((rows - y0 + 0.5) * sy / step - start[:, 0, None, None]) * (2.0 / s) - 1.0
    u, v = torch.broadcast_tensors(u, v)
    grid = torch.stack([u, v], -1).float()
    return CirclePixels(flat, valid, grid, dist2.float(), torch.stack([centre_cols, centre_rows], 1) - big)
