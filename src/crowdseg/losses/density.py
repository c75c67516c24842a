"""Density-map counting loss: squared error to a Gaussian target density at the model's stride.

The target is the standard one of CSRNet-style counters (each head point spread by a Gaussian of
`sigma` pixels, the map summing to the number of people), built directly at the output stride:
every point's Gaussian is integrated exactly over each stride x stride cell (a product of two 1-D
normal CDF differences), so no full-resolution map is drawn and then pooled. The part of a
Gaussian that falls outside the image is given back to the cells inside it (each point's mass
is renormalised to 1), so the target of an image integrates to its point count exactly.

Loss (CSRNet's Euclidean loss, without its factor 1/2): per image the sum over cells of
(predicted density - target)^2, averaged over the images of the batch. Cells of the zero padding
of smaller images in a batch have target 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def gaussian_cell_mass(coords: Tensor, num_cells: int, extent: int, stride: int, sigma: float) -> Tensor:
    """Fraction of each 1-D Gaussian N(coord, sigma^2) in each cell, renormalised over the image.

    coords: (N,) float pixel-index coordinates along one axis; the image spans pixels 0..extent-1,
    i.e. [-0.5, extent - 0.5]; cell j covers [j*stride - 0.5, (j+1)*stride - 0.5] clipped to that
    span (cells beyond the image get 0). Returns (N, num_cells) float32 whose rows sum to 1 (0 for a
    point whose Gaussian has no mass on the cells, i.e. far outside the image).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = coords.detach().to(torch.float64).reshape(-1, 1)
    edges = torch.arange(num_cells + 1, device=coords.device, dtype=torch.float64) * stride - 0.5
    edges = edges.clamp(-0.5, extent - 0.5)
    cdf = 0.5 * (1.0 + torch.erf((edges[None, :] - x) / (sigma * math.sqrt(2.0))))
    mass = cdf[:, 1:] - cdf[:, :-1]
    total = mass.sum(dim=1, keepdim=True)
    mass = torch.where(total > 1e-12, mass / total.clamp_min(1e-12), torch.zeros_like(mass))
    return mass.to(torch.float32)


def gaussian_density_target(points: Tensor, image_size: tuple[int, int], map_size: tuple[int, int],
                            stride: int, sigma: float) -> Tensor:
    """Target density (h, w) of one image at `stride`.

    points: (N, 2) float xy in pixels; image_size: (H, W) of the unpadded image; map_size: (h, w)
    of the model's output (may extend over padding). Sums to N (points inside the image).
    """
    height, width = (int(v) for v in image_size)
    h, w = (int(v) for v in map_size)
    if points.shape[0] == 0:
        return torch.zeros(h, w, device=points.device)
    mass_x = gaussian_cell_mass(points[:, 0], w, width, stride, sigma)    # (N, w)
    mass_y = gaussian_cell_mass(points[:, 1], h, height, stride, sigma)   # (N, h)
    return mass_y.T @ mass_x


def density_targets(points: Sequence[Tensor], image_size: Tensor, map_size: tuple[int, int], stride: int,
                    sigma: float) -> Tensor:
    """Targets (B, h, w) of a batch: points B tensors (N_b, 2); image_size (B, 2) long (H, W)."""
    return torch.stack([gaussian_density_target(p, tuple(s.tolist()), map_size, stride, sigma)
                        for p, s in zip(points, image_size)])


def density_squared_error(density: Tensor, target: Tensor) -> Tensor:
    """Per image sum over cells of (density - target)^2, averaged over the batch.

    density, target: (B, 1, h, w) or (B, h, w). Returns a scalar.
    """
    if density.dim() == 4:
        density = density[:, 0]
    if target.dim() == 4:
        target = target[:, 0]
    return ((density - target) ** 2).flatten(start_dim=1).sum(dim=1).mean()


class DensityLoss(nn.Module):
    """Gaussian-target squared error (see the module docstring) at `stride` with `sigma` pixels.

    forward(density (B, 1, h, w), points: B tensors (N_b, 2), image_size (B, 2) long) returns
    {"loss", "count_error" (mean |sum of density - N_b|, detached, a training diagnostic)}.
    """

    def __init__(self, stride: int = 8, sigma: float = 4.0) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.stride, self.sigma = int(stride), float(sigma)

    def forward(self, density: Tensor, points: Sequence[Tensor], image_size: Tensor) -> dict[str, Tensor]:
        target = density_targets([p.to(density.device) for p in points], image_size,
                                 tuple(density.shape[-2:]), self.stride, self.sigma).to(density)
        loss = density_squared_error(density, target)
        counts = torch.tensor([len(p) for p in points], dtype=density.dtype, device=density.device)
        count_error = (density.detach().flatten(start_dim=1).sum(dim=1) - counts).abs().mean()
        return {"loss": loss, "count_error": count_error}


def density_point_logits(density: Tensor, threshold: float, eps: float = 1e-6) -> Tensor:
    """Point-decision logits log(density / threshold) of a density map, any shape.

    They let the soft one-point term (`SoftOnePointLoss`, made for point-decision logit maps) apply
    to a density map: a cell "is a point" where its density exceeds `threshold`, and
    sigmoid(logit / T) = d^(1/T) / (d^(1/T) + threshold^(1/T)) is its soft point count: 0 for an
    empty cell, 1/2 at the threshold, -> 1 above it. With sigma = 4 px at stride 8, the cell holding
    a head point receives 0.23 to 0.47 of its mass (corner vs. centre), its neighbours less.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return torch.log(density.clamp_min(eps)) - math.log(threshold)
