"""Disc geometry shared by XMask's discriminative loss and its pseudo instance masks (METHODS.md A2.3, A2.5).

Every point p_i owns a disc of radius r_i (its NNEC radius, the distance to the nearest other
point, clamped). Both the loss and the pseudo masks look only at the pixels inside those discs, so
instead of one (H, W) map per point (N x H x W work, what the published code does in a Python loop)
the (point, pixel) pairs inside the discs are enumerated once, vectorised (`disc_pixel_pairs`): the
work is the total disc area, sum_i pi r_i^2, which in a crowd is about the image area however many
people there are, plus an O(N log N) nearest-neighbour query.

Conventions: points (N, 2) float xy in pixels, pixel (row i, col j) has centre (x=j, y=i); a pixel is
inside the disc of p when (j - x)^2 + (i - y)^2 <= r^2 (XMask's `dist <= radius`). Flat pixel index =
row * W + col.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crowdseg.dpmo.nnec import nnec_radii

# Smallest disc radius, in pixels, of XMask's discriminative loss and pseudo masks: the published
# `DiscriminativeLoss(min_radius=3)` (xmask/losses/discriminative.py) and the clamp [3, min(H, W) / 2]
# of xmask/pseudo/instance_map.py (METHODS.md A2.3 step 1, A2.5).
MIN_RADIUS = 3.0


def logit(p: float) -> float:
    """log(p / (1 - p)) for p in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability in (0, 1) is needed, got {p}")
    return math.log(p / (1.0 - p))


def gaussian_kernel1d(kernel_size: int = 7, sigma: float = 1.5, device=None, dtype=torch.float32) -> Tensor:
    """(k,) normalised Gaussian weights; an even size is made odd (k + 1), as XMask does."""
    k = kernel_size if kernel_size % 2 == 1 else kernel_size + 1
    coords = torch.arange(k, device=device, dtype=dtype) - k // 2
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def gaussian_smooth(features: Tensor, kernel_size: int = 7, sigma: float = 1.5) -> Tensor:
    """Separable depthwise Gaussian blur with zero padding: (D, H, W) or (B, D, H, W), same shape out."""
    squeeze = features.dim() == 3
    x = features.unsqueeze(0) if squeeze else features
    d = x.shape[1]
    g = gaussian_kernel1d(kernel_size, sigma, x.device, x.dtype)
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(d, 1, 1, k), padding=(0, k // 2), groups=d)
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(d, 1, k, 1), padding=(k // 2, 0), groups=d)
    return x[0] if squeeze else x


def embedding_at_image_resolution(embedding: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Bilinear upsampling of a stride-`stride` map to the image grid, then cropped / zero-padded.

    embedding: (D, h, w) or (B, D, h, w). The map is upsampled to (h * stride, w * stride), the padded
    image it was computed on (XMask upsamples to the padded batch size), then cut to `size` (H, W).
    """
    squeeze = embedding.dim() == 3
    x = embedding.unsqueeze(0) if squeeze else embedding
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    H, W = size
    x = x[..., :H, :W]
    if x.shape[-2] < H or x.shape[-1] < W:
        x = F.pad(x, (0, W - x.shape[-1], 0, H - x.shape[-2]))
    return x[0] if squeeze else x


def nn_radii(points: Tensor, size: tuple[int, int], min_radius: float = MIN_RADIUS, max_radius: Optional[float] = None,
             lone_radius: Optional[float] = None) -> Tensor:
    """NNEC radius of every point (crowdseg.dpmo.nnec): the distance to the nearest other point,
    clamped to [min_radius, max_radius] (default min(H, W) / 2); a lone point gets `lone_radius`
    (default min(H, W) / 4, XMask's pseudo-mask rule; its discriminative loss uses min(H, W) / 2).

    points: (N, 2) xy; size: (H, W). Returns (N,) float32 on the points' device.
    """
    H, W = size
    r_max = min(H, W) / 2.0 if max_radius is None else float(max_radius)
    r_min = min(float(min_radius), r_max)  # a tiny image: the upper clamp wins (torch.clamp's rule)
    radii = nnec_radii(points.detach().cpu().double().numpy(), (H, W), 1.0, r_min, r_max, lone_radius)
    return torch.from_numpy(np.asarray(radii, np.float32)).to(points.device)


def own_pixels(points: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(rows, cols) long of the pixel (round(y), round(x)) of each point, clamped into the image."""
    H, W = size
    p = points.detach()
    return p[:, 1].round().long().clamp(0, H - 1), p[:, 0].round().long().clamp(0, W - 1)


def disc_pixel_pairs(points: Tensor, radii: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Every (point, pixel) pair with the pixel inside the image and inside the point's disc.

    points: (N, 2) xy; radii: (N,); size: (H, W). Returns point index (P,) long, flat pixel index
    (P,) long (row * W + col) and squared distance (P,) float, grouped by point in index order.
    No Python loop: each point's bounding square is enumerated with `repeat_interleave`.
    """
    H, W = size
    device = points.device
    n = points.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n == 0:
        return empty, empty, torch.zeros(0, device=device)
    p = points.detach().float()
    r = radii.detach().float().to(device)
    half = torch.ceil(r).long() + 1
    side = 2 * half + 1
    sizes = side * side
    owner = torch.repeat_interleave(torch.arange(n, device=device), sizes)
    start = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(owner.numel(), device=device) - start[owner]
    s, hf = side[owner], half[owner]
    cols = p[:, 0].round().long()[owner] + local % s - hf
    rows = p[:, 1].round().long()[owner] + local // s - hf
    sq = (cols.float() - p[owner, 0]) ** 2 + (rows.float() - p[owner, 1]) ** 2
    keep = (cols >= 0) & (cols < W) & (rows >= 0) & (rows < H) & (sq <= r[owner] ** 2)
    return owner[keep], rows[keep] * W + cols[keep], sq[keep]


def disc_union(points: Tensor, radius: float, size: tuple[int, int]) -> Tensor:
    """(H, W) bool: pixels within `radius` of any point (XMask's invalid zones around unsure points).

    Few points: the pixels of each disc (`disc_pixel_pairs`); when the discs would cover the image
    several times over (thousands of unsure points of an untrained teacher), one nearest-point query
    per pixel (a KD-tree), whose cost does not grow with the number of discs."""
    H, W = size
    n = points.shape[0]
    if n == 0:
        return torch.zeros((H, W), dtype=torch.bool, device=points.device)
    if n * (2 * math.ceil(radius) + 3) ** 2 <= 4 * H * W:
        out = torch.zeros(H * W, dtype=torch.bool, device=points.device)
        _, pixels, _ = disc_pixel_pairs(points, torch.full((n,), float(radius), device=points.device), size)
        out[pixels] = True
        return out.view(H, W)
    from scipy.spatial import cKDTree

    ys, xs = np.mgrid[0:H, 0:W]
    pixels = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    dist, _ = cKDTree(points.detach().cpu().double().numpy()).query(pixels, k=1, distance_upper_bound=float(radius) + 1e-6)
    return torch.from_numpy((dist <= float(radius)).reshape(H, W)).to(points.device)


def sample_centres(embedding: Tensor, points: Tensor) -> Tensor:
    """Embedding at each point's own pixel, differentiable: (D, H, W), (N, 2) xy -> (N, D).

    `grid_sample` (bilinear, align_corners=True) at the rounded point (XMask's differentiable
    centre sampling); at an integer location it equals the pixel's vector, with its gradient.
    """
    D, H, W = embedding.shape
    if points.shape[0] == 0:
        return embedding.new_zeros((0, D))
    rows, cols = own_pixels(points, (H, W))
    gx = cols.float() * 2.0 / max(W - 1, 1) - 1.0
    gy = rows.float() * 2.0 / max(H - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=1).view(1, -1, 1, 2).to(embedding.dtype)
    return F.grid_sample(embedding.unsqueeze(0), grid, mode="bilinear", align_corners=True)[0, :, :, 0].t()


def pair_distances(embedding: Tensor, centres: Tensor, point_index: Tensor, pixel_index: Tensor,
                   eps: float = 1e-12) -> Tensor:
    """||E(x) - e_i||_2 for each pair: embedding (D, H, W), centres (N, D) -> (P,).

    sqrt(sum + eps) keeps the gradient finite at the centre pixel itself (distance 0)."""
    D = embedding.shape[0]
    flat = embedding.reshape(D, -1)
    diff = flat[:, pixel_index].t() - centres[point_index]
    return torch.sqrt((diff * diff).sum(dim=1) + eps)
