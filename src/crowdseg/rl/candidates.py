"""Candidate points around each predicted point: the group of one RPS "query" (METHODS.md D2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sample_candidates(points: Tensor, radii: Tensor, num_candidates: int, sigma: float,
                      image_size: tuple[int, int], generator: Optional[torch.Generator] = None) -> Tensor:
    """K candidates per point: index 0 is the point itself, the rest drawn from N(p, (sigma * r)^2 I).

    points: (N, 2) float, xy in pixels; radii: (N,) float NNEC radii in pixels; image_size: (H, W).
    All candidates (the point at index 0 too) are clamped into the image, x in [0, W-1] and y in
    [0, H-1]. The noise is drawn on the generator's device (CPU when none), then moved to the
    points' device, so a seeded CPU generator gives the same candidates on CPU and CUDA.
    Returns (N, K, 2) float, detached.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be (N, 2), got {tuple(points.shape)}")
    if radii.shape != points.shape[:1]:
        raise ValueError(f"radii must be (N,) = ({points.shape[0]},), got {tuple(radii.shape)}")
    points = points.detach().float()
    n = points.shape[0]
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((n, num_candidates - 1, 2), generator=generator, device=noise_device)
    scale = (sigma * radii.detach().float()).to(points.device)[:, None, None]
    jittered = points[:, None, :] + noise.to(points.device) * scale
    candidates = torch.cat([points[:, None, :], jittered], dim=1)
    height, width = image_size
    limits = torch.tensor([width - 1, height - 1], dtype=candidates.dtype, device=candidates.device)
    return torch.minimum(candidates.clamp_min(0.0), limits)
