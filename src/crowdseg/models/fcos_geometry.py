"""FCOS geometry shared by the detector (decoding) and its losses (assignment): the levels' size ranges
and box decoding from a location's distances. Models and losses both import it; it imports neither."""
from __future__ import annotations

from typing import Sequence

import torch

INF = float("inf")
DEFAULT_SIZES_OF_INTEREST = (64, 128, 256, 512)  # level boundaries of the largest regression distance


def level_ranges(num_levels: int, sizes_of_interest: Sequence[float] = DEFAULT_SIZES_OF_INTEREST) -> torch.Tensor:
    """(L, 2) [lo, hi] of the largest regression distance per level: [0, s0], [s0, s1], ..., [s_last, inf]."""
    if len(sizes_of_interest) != num_levels - 1:
        raise ValueError(f"{num_levels} levels need {num_levels - 1} sizes of interest, got {len(sizes_of_interest)}")
    bounds = [0.0, *[float(s) for s in sizes_of_interest], INF]
    return torch.tensor([[bounds[i], bounds[i + 1]] for i in range(num_levels)])


def decode_boxes(locations: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Boxes xyxy from locations (..., 2) and distances (..., 4) left, top, right, bottom."""
    x, y = locations[..., 0], locations[..., 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], dim=-1)
