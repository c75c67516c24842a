"""Online pseudo instance masks from a teacher's point logits and embeddings (METHODS.md A2.5).

For one image:
1. candidate points: every stride-4 cell with logit >= logit(p_low) (default p_low = 0.1), at its
   centre in image pixels; confident points: logit > logit(p_high) (0.9);
2. radius r_i: NNEC radius among the candidates (nearest other candidate), clamped to
   [3, min(H, W) / 2]; a lone candidate gets min(H, W) / 4;
3. the embedding (stride 4) is upsampled to the image and Gaussian-smoothed (k = 7, sigma 1.5);
   e_i = E(p_i) at the point's own pixel;
4. energy of pixel x in the disc of p_i: ||E(x) - e_i|| + lambda_geo * (|x - p_i| / r_i)^2;
5. gate: without the density gate (phase 2, evaluation) a pixel is a candidate of p_i when its
   energy < threshold; with it (phase 3), points with logit in [logit(p_low), logit(p_mid)] take
   their whole disc, points above logit(p_mid) the energy gate, points below are skipped;
6. a pixel claimed by several points goes to the one of lowest energy (ties: the higher index);
7. every kept point gets its own pixel (round(y), round(x)).

The result is an (H, W) id map, 0 background and k + 1 the instance of candidate k, so instances are
disjoint by construction, lie inside their discs, and contain their point.

Our choices vs the published code (`xmask/pseudo/instance_map.py`): every candidate gets a mask
(it builds masks for only every (N // 50)-th point when N > 50, so dense images lose most of
their instances); overlaps go to the lowest energy instead of "later points overwrite earlier
ones" (which depends on raster order); step 7 is ours (a later disc could take a point's own
pixel). All points are processed together (`discs.disc_pixel_pairs`): no per-point loop, cost
proportional to the total disc area plus O(N log N) for the radii.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from crowdseg.models.xmask import STRIDE, logit_points
from crowdseg.xmask.discs import (MIN_RADIUS, disc_pixel_pairs, embedding_at_image_resolution, gaussian_smooth,
                                  logit, nn_radii, own_pixels, pair_distances, sample_centres)


@dataclass(frozen=True)
class PseudoMaskSettings:
    """Thresholds of the pseudo masks. Training: threshold 0.8, lambda_geo 0.6 (SHA-40: 0.95 / 0.4);
    XMask's evaluation: 1.1 / 0.8 with sigma 3.0."""
    energy_threshold: float = 0.8
    lambda_geo: float = 0.6
    p_low: float = 0.1
    p_mid: float = 0.5
    p_high: float = 0.9
    min_radius: float = MIN_RADIUS
    kernel_size: int = 7
    sigma: float = 1.5


@dataclass
class PseudoInstances:
    """The pseudo instances of one image.

    instance_map: (H, W) long, 0 background, k + 1 the instance of point k; points: (N, 2) xy of the
    candidate cells; logits: (N,); confident: (N,) bool (logit > logit(p_high)); radii: (N,).
    """
    instance_map: Tensor
    points: Tensor
    logits: Tensor
    confident: Tensor
    radii: Tensor


def candidate_points(logits: Tensor, stride: int = STRIDE, p_low: float = 0.1,
                     p_high: float = 0.9) -> tuple[Tensor, Tensor, Tensor]:
    """Cells with logit >= logit(p_low): (points (N, 2) xy, logits (N,), confident (N,) bool).

    logits: (h, w) or (1, h, w) teacher point logits at `stride`.
    """
    points, values = logit_points(logits, logit(p_low), stride, inclusive=True)
    return points, values, values > logit(p_high)


@torch.no_grad()
def pseudo_instance_map(embedding: Tensor, points: Tensor, point_logits: Optional[Tensor] = None,
                        settings: PseudoMaskSettings = PseudoMaskSettings(), density_gate: bool = False,
                        smoothed: bool = False, radii: Optional[Tensor] = None) -> Tensor:
    """The pseudo id map of one image (steps 2-7 of the module docstring).

    embedding: (D, H, W) at image resolution (already smoothed when `smoothed`); points: (N, 2) xy;
    point_logits: (N,) teacher logits at the points (needed for `density_gate`); radii: optional (N,)
    (default: NNEC radii). Returns (H, W) long.
    """
    D, H, W = embedding.shape
    n = points.shape[0]
    out = torch.zeros(H * W, dtype=torch.long, device=embedding.device)
    if n == 0:
        return out.view(H, W)
    if density_gate and point_logits is None:
        raise ValueError("the density gate needs the points' logits")
    emb = embedding if smoothed else gaussian_smooth(embedding, settings.kernel_size, settings.sigma)
    if radii is None:
        radii = nn_radii(points, (H, W), settings.min_radius)
    owner, pixel, sq = disc_pixel_pairs(points, radii, (H, W))
    centres = sample_centres(emb, points)
    energy = pair_distances(emb, centres, owner, pixel) + settings.lambda_geo * sq / (radii[owner] + 1e-6) ** 2

    keep_point = torch.ones(n, dtype=torch.bool, device=embedding.device)
    gated = torch.ones(n, dtype=torch.bool, device=embedding.device)  # True: energy gate, False: whole disc
    if density_gate:
        lo, mid = logit(settings.p_low), logit(settings.p_mid)
        z = point_logits.to(embedding.device)
        keep_point = z >= lo
        gated = z > mid
    claim = keep_point[owner] & (~gated[owner] | (energy < settings.energy_threshold))
    owner, pixel, energy = owner[claim], pixel[claim], energy[claim]

    if owner.numel():
        best = torch.full((H * W,), float("inf"), device=embedding.device)
        best = best.scatter_reduce(0, pixel, energy, reduce="amin")
        winner = energy <= best[pixel]
        out.scatter_reduce_(0, pixel[winner], owner[winner] + 1, reduce="amax")
    rows, cols = own_pixels(points, (H, W))
    kept = torch.nonzero(keep_point).squeeze(1)
    out.scatter_reduce_(0, rows[kept] * W + cols[kept], kept + 1, reduce="amax", include_self=False)
    return out.view(H, W)


@torch.no_grad()
def pseudo_instances(logits: Tensor, embedding: Tensor, size: tuple[int, int],
                     settings: PseudoMaskSettings = PseudoMaskSettings(), density_gate: bool = False,
                     stride: int = STRIDE) -> PseudoInstances:
    """Pseudo instances of one image from teacher outputs.

    logits: (1, h, w) or (h, w) point logits; embedding: (D, h, w) at `stride`; size: (H, W) of the
    image (the unpadded part of the batch image). Points outside (H, W) (padding) are dropped.
    """
    points, values, confident = candidate_points(logits, stride, settings.p_low, settings.p_high)
    H, W = size
    inside = (points[:, 0] < W) & (points[:, 1] < H)
    points, values, confident = points[inside], values[inside], confident[inside]
    emb = gaussian_smooth(embedding_at_image_resolution(embedding, (H, W), stride), settings.kernel_size, settings.sigma)
    radii = nn_radii(points, (H, W), settings.min_radius)
    instance_map = pseudo_instance_map(emb, points, values, settings, density_gate, smoothed=True, radii=radii)
    return PseudoInstances(instance_map, points, values, confident, radii)


def confident_instances(points: Tensor, confident: Tensor, instance_map: Tensor, num_instances: int) -> Tensor:
    """(K,) bool: instances (id k + 1) under at least one confident point (the mask-constraint's
    valid instances on unlabeled images). points: (N, 2) xy; confident: (N,) bool; instance_map: (H, W)."""
    valid = torch.zeros(num_instances, dtype=torch.bool, device=instance_map.device)
    if num_instances == 0 or not bool(confident.any()):
        return valid
    rows, cols = own_pixels(points[confident], tuple(instance_map.shape))
    ids = instance_map[rows, cols]
    ids = ids[(ids > 0) & (ids <= num_instances)]
    valid[ids - 1] = True
    return valid
