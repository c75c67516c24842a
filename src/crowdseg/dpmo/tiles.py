"""Tiling of dense or large images so that a head spans enough SAM input pixels.

SAM sees a fixed square input (1024 px for vit_*, 256 for `tiny`). An image is resized by a
scale s; a head whose nearest neighbour is d pixels away spans about s * d input pixels. We pick

    s = clamp(target_nn_px / median NN distance, s_fit, max_scale),   s_fit = input / max(H, W)

(`tile_scale`). When s <= s_fit the whole image is one tile, resized like SAM does (longest side
to the input size). Otherwise the image is cut into a grid of *cores* that partition it; each
core is grown by `overlap` pixels on every side (clipped to the image) into the *context* that is
resized by s and encoded. A context spans at most floor(input / s) pixels, so it fits the input.

Each point is owned by the tile whose core holds its pixel (round(y), round(x)); its mask is
decoded only in that tile, but may cover context pixels outside the core, and all tiles write
into one image-wide canvas (`resolve.py`), so there are no seams in ownership and no duplicate
ids. Remaining seams: (1) SAM's output depends on the tile's content (a head near a core edge is
seen with less context on one side); (2) a circle reaching beyond its tile's context is cut there
(the default overlap, the 95th percentile radius + 1, avoids this for most points; the overlap is
also capped at a quarter of the context side, which `plan_tiles` reports).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    core: tuple[int, int, int, int]      # x0, y0, x1, y1 (half-open): the pixels whose points it owns
    context: tuple[int, int, int, int]   # x0, y0, x1, y1 (half-open): the region fed to SAM
    resized_hw: tuple[int, int]          # (h, w) of the context after resizing, <= input size

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Input pixels per image pixel along x and y (exact for this tile's rounding)."""
        x0, y0, x1, y1 = self.context
        return self.resized_hw[1] / (x1 - x0), self.resized_hw[0] / (y1 - y0)


def tile_scale(image_hw: tuple[int, int], input_size: int, median_nn: float, target_nn_px: float,
               max_scale: float, tile: bool = True) -> float:
    """Image-to-input scale: the whole image fitted, or larger so a median head gap spans target_nn_px."""
    fit = input_size / max(image_hw)
    if not tile or not np.isfinite(median_nn) or median_nn <= 0:
        return fit
    return max(min(target_nn_px / median_nn, max_scale), fit)


def plan_tiles(image_hw: tuple[int, int], input_size: int, scale: float, overlap: int) -> tuple[list[Tile], bool]:
    """Tiles covering an image of size (H, W) at `scale` input pixels per image pixel.

    Returns (tiles in raster order, overlap_capped). The cores partition the image; contexts add
    `overlap` pixels (capped at a quarter of the context side; `overlap_capped` says so).
    """
    h, w = image_hw
    fit = input_size / max(h, w)
    if scale <= fit * (1 + 1e-9):
        resized = (min(round(h * fit), input_size), min(round(w * fit), input_size))
        full = (0, 0, w, h)
        return [Tile(full, full, resized)], False
    side = int(math.floor(input_size / scale))
    capped = overlap > side // 4
    overlap = min(int(overlap), side // 4)
    core = max(side - 2 * overlap, 1)
    ys = _even_edges(h, math.ceil(h / core))
    xs = _even_edges(w, math.ceil(w / core))
    tiles = []
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            cx0, cy0 = max(x0 - overlap, 0), max(y0 - overlap, 0)
            cx1, cy1 = min(x1 + overlap, w), min(y1 + overlap, h)
            resized = (min(round((cy1 - cy0) * scale), input_size), min(round((cx1 - cx0) * scale), input_size))
            tiles.append(Tile((x0, y0, x1, y1), (cx0, cy0, cx1, cy1), resized))
    return tiles, capped


def auto_overlap(radii: np.ndarray) -> int:
    """Default context overlap: the 95th percentile NNEC radius + 1 pixel (0 without points).

    Not the largest radius: a few isolated people have circles of up to min(H, W) / 2, and an
    overlap that large would multiply the number of tiles for everybody else.
    """
    return int(np.ceil(np.percentile(radii, 95))) + 1 if len(radii) else 0


def assign_points(tiles: list[Tile], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(N,) index of the tile whose core holds each point pixel (rows, cols)."""
    owner = np.full(len(rows), -1, np.int64)
    for t, tile in enumerate(tiles):
        x0, y0, x1, y1 = tile.core
        inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
        owner[inside & (owner < 0)] = t
    return owner


def _even_edges(length: int, parts: int) -> list[int]:
    """parts + 1 integer edges splitting [0, length) into parts differing by at most one pixel."""
    return [round(k * length / parts) for k in range(parts + 1)]
