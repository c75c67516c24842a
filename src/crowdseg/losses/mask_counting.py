"""Mask-supervised counting losses (METHODS.md A2.4, generalised from XMask's MaskConstraintLoss).

Instance masks (ground truth, DPMO or pseudo masks) tell a counting model where each person is.
Three terms use them:

* **background suppression**: no density (or no point probability) on background pixels;
* **unit mass**: the density integrated over each instance mask is 1;
* **soft one point**: the soft number of point decisions inside each instance mask is 1.

They come in three flavours, one per kind of counting output:

* density maps (CSRNet-style, ``crowdseg.models.density``): `density_at_mask_resolution` upsamples
  the (h, w) map to the mask resolution preserving its total mass (the scale factor is detached,
  as in XMask), then `background_suppression_loss` and `unit_mass_loss` apply per pixel;
* point predictors (P2PNet-style: points with person probabilities): `point_background_loss` is the
  mean probability of the points on background, `point_unit_mass_loss` asks that the probabilities
  of the points inside each mask sum to 1. The sum of probabilities is the soft number of points,
  so for a point predictor the unit-mass term *is* the soft one-point term;
* point-decision logit maps (XMask/P2R-style, a cell is a point where its logit is > 0):
  `soft_one_point_loss` treats every cell centre as a point with probability sigmoid(logit / T).

Why the soft one-point term: XMask counts ``#{x in M_k : up(x) > 0}``. A count has zero gradient
almost everywhere, so the published term never trains anything (METHODS.md H.4). Replacing the
indicator 1[z > 0] by sigmoid(z / T) gives a smooth function of the logits whose limit T -> 0 is the
hard count; its gradient sigmoid'(z / T) / T is largest for cells near the decision boundary and
vanishes for confident cells, which is where the hard count already agrees. We also count cells at
the logit map's own resolution, not upsampled pixels: XMask counts pixels of the bilinearly
upsampled map, so one positive cell at stride 4 already counts as about 16 "points".
`hard_one_point_error` is the hard version, for logging.

Conventions: ``instance_map`` is (H, W) int64, 0 background and k the instance of point k-1;
``valid`` optionally restricts the instance terms to a subset, as a (K,) bool tensor indexed by
k-1 (e.g. instances hit by confident teacher points). Instances whose mask is empty (or, for
points, that no point falls in) are left out, since nothing can change their term. Every term
returns a scalar that is 0 (still attached to the graph) when it has nothing to average over.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crowdseg.geometry import pixels_inside, point_pixels

_EPS = 1e-8


# ----------------------------------------------------------------------------------------- helpers
def _zero(t: Tensor) -> Tensor:
    """A scalar 0 attached to `t`'s graph, so backward and DDP see every parameter used."""
    return t.sum() * 0.0


def _check_instance_map(instance_map: Tensor) -> None:
    if instance_map.dim() != 2:
        raise ValueError(f"instance_map must be (H, W), got shape {tuple(instance_map.shape)}")
    if instance_map.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"instance_map must be an integer id map, got dtype {instance_map.dtype}")


def _instance_count(instance_map: Tensor, num_instances: Optional[int], valid: Optional[Tensor]) -> int:
    if num_instances is not None:
        return int(num_instances)
    if valid is not None:
        return int(valid.numel())
    return int(instance_map.max().item()) if instance_map.numel() else 0


def _keep_instances(present: Tensor, valid: Optional[Tensor]) -> Tensor:
    """(K,) bool: instances with something inside, restricted to `valid` when given."""
    if valid is None:
        return present
    if valid.shape != present.shape:
        raise ValueError(f"valid must have one entry per instance ({present.numel()}), got {tuple(valid.shape)}")
    return present & valid.to(device=present.device, dtype=torch.bool)


def sum_per_instance(values: Tensor, ids: Tensor, num_instances: int) -> tuple[Tensor, Tensor]:
    """Sum `values` per instance id.

    values: (P,) float; ids: (P,) long in [0, K] (0 = background, entries < 0 ignored).
    Returns sums (K,) float (differentiable w.r.t. values) and counts (K,) long, for ids 1..K.
    """
    keep = (ids >= 0) & (ids <= num_instances)
    if not bool(keep.all()):
        if bool((ids > num_instances).any()):
            raise ValueError(f"instance id {int(ids.max())} exceeds the number of instances {num_instances}")
        values, ids = values[keep], ids[keep]
    sums = values.new_zeros(num_instances + 1).index_add(0, ids, values)
    counts = torch.bincount(ids, minlength=num_instances + 1)
    return sums[1:], counts[1:]


# ------------------------------------------------------------------------------------ density maps
def mass_preserving_upsample(density: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly upsample a density map to `size`, rescaled so its total (ReLU) mass is unchanged.

    density: (..., h, w) float. Returns (..., H, W). The scale factor sum(relu(density)) /
    sum(relu(up)) is detached (as in XMask), so gradients flow through the interpolation only; when
    the map has no positive mass the factor falls back to the area ratio h*w / (H*W).
    """
    h, w = density.shape[-2:]
    lead = density.shape[:-2]
    flat = density.reshape(-1, 1, h, w)
    up = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        mass = flat.relu().sum(dim=(-2, -1), keepdim=True)
        up_mass = up.relu().sum(dim=(-2, -1), keepdim=True)
        area_ratio = (h * w) / float(size[0] * size[1])
        scale = torch.where(up_mass > _EPS, mass / up_mass.clamp_min(_EPS), torch.full_like(mass, area_ratio))
    return (up * scale).reshape(*lead, *size)


def density_at_mask_resolution(density: Tensor, mask_size: tuple[int, int], stride: Optional[int] = None) -> Tensor:
    """Mass-preserving density at the resolution of an instance map.

    density: (h, w) float at `stride` pixels per cell; mask_size: (H, W) of the instance map.
    With `stride` the map is upsampled to (h*stride, w*stride) (the padded image it was computed
    on) and cropped (or zero-padded) to (H, W), so cell centres stay at j*stride + (stride-1)/2.
    Without it, it is resized to (H, W) directly (XMask's behaviour). Returns (H, W).
    """
    if stride is None:
        return mass_preserving_upsample(density, mask_size)
    h, w = density.shape[-2:]
    up = mass_preserving_upsample(density, (h * stride, w * stride))
    H, W = mask_size
    up = up[..., :H, :W]
    pad_h, pad_w = H - up.shape[-2], W - up.shape[-1]
    if pad_h > 0 or pad_w > 0:
        up = F.pad(up, (0, max(pad_w, 0), 0, max(pad_h, 0)))
    return up


def background_suppression_loss(density: Tensor, instance_map: Tensor, region: Optional[Tensor] = None) -> Tensor:
    """Mean of relu(density) over background pixels (instance_map == 0, inside `region` if given).

    density: (H, W) float at mask resolution; instance_map: (H, W) long; region: (H, W) bool.
    Returns a scalar; 0 when there is no background pixel.
    """
    return _background(density, instance_map, region)[0]


def _background(density: Tensor, instance_map: Tensor, region: Optional[Tensor]) -> tuple[Tensor, bool]:
    _check_instance_map(instance_map)
    background = instance_map == 0
    if region is not None:
        background = background & region.to(torch.bool)
    n = int(background.sum())
    if n == 0:
        return _zero(density), False
    return density.relu()[background].sum() / n, True


def unit_mass_loss(density: Tensor, instance_map: Tensor, valid: Optional[Tensor] = None,
                   num_instances: Optional[int] = None) -> Tensor:
    """Mean over instances k of |sum_{x in M_k} relu(density(x)) - 1|.

    density: (H, W) float at mask resolution (use `density_at_mask_resolution`); instance_map:
    (H, W) long; valid: (K,) bool or None. Instances with an empty mask are left out. Returns a
    scalar; 0 when no instance is left.
    """
    return _unit_mass(density, instance_map, valid, num_instances)[0]


def _unit_mass(density: Tensor, instance_map: Tensor, valid: Optional[Tensor],
               num_instances: Optional[int]) -> tuple[Tensor, bool]:
    _check_instance_map(instance_map)
    k = _instance_count(instance_map, num_instances, valid)
    if k == 0:
        return _zero(density), False
    masses, areas = sum_per_instance(density.relu().reshape(-1), instance_map.reshape(-1).long(), k)
    return _mean_abs_deviation_from_one(masses, _keep_instances(areas > 0, valid), density)


def _mean_abs_deviation_from_one(masses: Tensor, keep: Tensor, like: Tensor) -> tuple[Tensor, bool]:
    if not bool(keep.any()):
        return _zero(like), False
    return (masses[keep] - 1.0).abs().mean(), True


# ---------------------------------------------------------------------------------- point outputs
def point_instance_ids(points: Tensor, instance_map: Tensor) -> Tensor:
    """Instance id under each point: (A, 2) xy pixels -> (A,) long.

    A point lies in the pixel (round(y), round(x)) (the data contract's convention). Points outside
    the image get 0 (background): a person predicted outside the image is a false positive.
    """
    _check_instance_map(instance_map)
    height, width = instance_map.shape
    rows, cols = point_pixels(points)
    inside = pixels_inside(rows, cols, height, width)
    ids = torch.zeros(points.shape[0], dtype=torch.long, device=instance_map.device)
    ids[inside] = instance_map[rows[inside], cols[inside]].long()
    return ids


def point_background_loss(points: Tensor, scores: Tensor, instance_map: Tensor,
                          region: Optional[Tensor] = None) -> Tensor:
    """Mean person probability of the points that fall on background (should be 0).

    points: (A, 2) xy pixels (positions are not differentiated); scores: (A,) in [0, 1];
    instance_map: (H, W) long; region: optional (H, W) bool, points on pixels outside it are ignored.
    Returns a scalar; 0 when no point is on background.
    """
    return _point_background(points, scores, instance_map, region)[0]


def _point_background(points: Tensor, scores: Tensor, instance_map: Tensor,
                      region: Optional[Tensor]) -> tuple[Tensor, bool]:
    ids = point_instance_ids(points, instance_map)
    on_background = ids == 0
    if region is not None:
        on_background = on_background & _points_in_region(points, region)
    n = int(on_background.sum())
    if n == 0:
        return _zero(scores), False
    return scores.reshape(-1)[on_background].sum() / n, True


def _points_in_region(points: Tensor, region: Tensor) -> Tensor:
    height, width = region.shape
    rows, cols = point_pixels(points)
    inside = pixels_inside(rows, cols, height, width)
    out = torch.zeros_like(inside)
    out[inside] = region.to(torch.bool)[rows[inside], cols[inside]]
    return out


def point_unit_mass_loss(points: Tensor, scores: Tensor, instance_map: Tensor, valid: Optional[Tensor] = None,
                         num_instances: Optional[int] = None) -> Tensor:
    """Mean over instances k of |sum of scores of the points inside M_k - 1|.

    points: (A, 2) xy pixels (e.g. P2PNet anchors or predicted points, not differentiated);
    scores: (A,) person probabilities; instance_map: (H, W) long; valid: (K,) bool or None.
    Instances that no point falls in are left out (no score can change them). Returns a scalar.
    """
    return _point_unit_mass(points, scores, instance_map, valid, num_instances)[0]


def _point_unit_mass(points: Tensor, scores: Tensor, instance_map: Tensor, valid: Optional[Tensor],
                     num_instances: Optional[int]) -> tuple[Tensor, bool]:
    k = _instance_count(instance_map, num_instances, valid)
    if k == 0 or points.shape[0] == 0:
        return _zero(scores), False
    ids = point_instance_ids(points, instance_map)
    masses, hits = sum_per_instance(scores.reshape(-1), ids, k)
    return _mean_abs_deviation_from_one(masses, _keep_instances(hits > 0, valid), scores)


def cell_centers(height: int, width: int, stride: int, device: Optional[torch.device] = None) -> Tensor:
    """Pixel xy of the centres of an (height, width) grid of cells at `stride`: (height*width, 2).

    Cell (i, j) covers pixels [j*stride, (j+1)*stride) and its centre is j*stride + (stride-1)/2;
    rows are in row-major order, matching ``map.reshape(-1)``.
    """
    offset = (stride - 1) / 2.0
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + offset
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + offset
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def soft_one_point_loss(logits: Tensor, instance_map: Tensor, stride: int, temperature: float = 1.0,
                        valid: Optional[Tensor] = None, num_instances: Optional[int] = None) -> Tensor:
    """Mean over instances k of |sum_{cells c in M_k} sigmoid(logit(c) / T) - 1|.

    logits: (h, w) point-decision logits (a cell is a point where its logit is > 0) at `stride`;
    instance_map: (H, W) long; a cell belongs to the instance under its centre pixel. The T -> 0
    limit is XMask's hard count (see the module docstring). Returns a scalar.
    """
    return _soft_one_point(logits, instance_map, stride, temperature, valid, num_instances)[0]


def _soft_one_point(logits: Tensor, instance_map: Tensor, stride: int, temperature: float,
                    valid: Optional[Tensor], num_instances: Optional[int]) -> tuple[Tensor, bool]:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h, w = logits.shape[-2:]
    centres = cell_centers(h, w, stride, device=logits.device)
    probabilities = torch.sigmoid(logits.reshape(-1) / temperature)
    return _point_unit_mass(centres, probabilities, instance_map, valid, num_instances)


@torch.no_grad()
def hard_one_point_error(logits: Tensor, instance_map: Tensor, stride: int, valid: Optional[Tensor] = None,
                         num_instances: Optional[int] = None) -> Tensor:
    """Mean over instances of |#{cells in M_k with logit > 0} - 1|: XMask's term (per cell), a metric."""
    h, w = logits.shape[-2:]
    centres = cell_centers(h, w, stride, device=logits.device)
    return point_unit_mass_loss(centres, (logits.reshape(-1) > 0).float(), instance_map, valid, num_instances)


# ------------------------------------------------------------------------------------- nn.Modules
def _mean_defined(terms: list[tuple[Tensor, bool]], like: Tensor) -> Tensor:
    """Average of the per-image terms that are defined; 0 (attached) when none is."""
    kept = [value for value, defined in terms if defined]
    return torch.stack(kept).mean() if kept else _zero(like)


def _valid_at(valid: Optional[Sequence[Optional[Tensor]]], b: int) -> Optional[Tensor]:
    return None if valid is None else valid[b]


class DensityMaskLoss(nn.Module):
    """Background suppression + unit mass for a density map (weights of each term as arguments).

    forward(density (B, 1, h, w) or (B, h, w) at `stride`, instance_maps: B tensors (H_b, W_b) long
    (images may be smaller than the padded batch), valid: optional B (K_b,) bool or None) returns
    {"loss", "background", "unit_mass"}; each term is averaged over the images where it is defined.
    """

    def __init__(self, stride: int, background_weight: float = 1.0, mass_weight: float = 1.0) -> None:
        super().__init__()
        self.stride = int(stride)
        self.background_weight = float(background_weight)
        self.mass_weight = float(mass_weight)

    def forward(self, density: Tensor, instance_maps: Sequence[Tensor],
                valid: Optional[Sequence[Optional[Tensor]]] = None) -> dict[str, Tensor]:
        if density.dim() == 4:
            density = density[:, 0]
        backgrounds, masses = [], []
        for b, instance_map in enumerate(instance_maps):
            up = density_at_mask_resolution(density[b], tuple(instance_map.shape), self.stride)
            backgrounds.append(_background(up, instance_map, None))
            masses.append(_unit_mass(up, instance_map, _valid_at(valid, b), None))
        background = _mean_defined(backgrounds, density)
        unit_mass = _mean_defined(masses, density)
        loss = self.background_weight * background + self.mass_weight * unit_mass
        return {"loss": loss, "background": background.detach(), "unit_mass": unit_mass.detach()}


class PointMaskLoss(nn.Module):
    """Background suppression + unit mass for a point predictor (P2PNet-style points and scores).

    forward(points (B, A, 2), (A, 2) shared by every image (e.g. P2PNet's ``anchors``) or B tensors
    (A_b, 2), xy pixels; scores (B, A) or B tensors (A_b,) person probabilities (P2PNet:
    ``logits.softmax(-1)[..., 1]``); instance_maps: B tensors (H_b, W_b) long; valid: optional B
    (K_b,) bool or None) returns {"loss", "background", "unit_mass"}. Pass anchor points to
    supervise each anchor's score by the mask it sits in, or predicted points to supervise where
    the points ended up.
    """

    def __init__(self, background_weight: float = 1.0, mass_weight: float = 1.0) -> None:
        super().__init__()
        self.background_weight = float(background_weight)
        self.mass_weight = float(mass_weight)

    def forward(self, points, scores, instance_maps: Sequence[Tensor],
                valid: Optional[Sequence[Optional[Tensor]]] = None) -> dict[str, Tensor]:
        like = scores if isinstance(scores, Tensor) else torch.cat([s.reshape(-1) for s in scores])
        shared = isinstance(points, Tensor) and points.dim() == 2
        backgrounds, masses = [], []
        for b, instance_map in enumerate(instance_maps):
            image_points = points if shared else points[b]
            backgrounds.append(_point_background(image_points, scores[b], instance_map, None))
            masses.append(_point_unit_mass(image_points, scores[b], instance_map, _valid_at(valid, b), None))
        background = _mean_defined(backgrounds, like)
        unit_mass = _mean_defined(masses, like)
        loss = self.background_weight * background + self.mass_weight * unit_mass
        return {"loss": loss, "background": background.detach(), "unit_mass": unit_mass.detach()}


class SoftOnePointLoss(nn.Module):
    """Soft one-point-per-instance term on a point-decision logit map (XMask/P2R-style heads).

    forward(logits (B, 1, h, w) or (B, h, w) at `stride`, instance_maps: B tensors (H_b, W_b),
    valid: optional) returns {"loss", "one_point" (soft, detached), "one_point_hard" (XMask's count
    per cell, a metric)}.
    """

    def __init__(self, stride: int, weight: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.stride = int(stride)
        self.weight = float(weight)
        self.temperature = float(temperature)

    def forward(self, logits: Tensor, instance_maps: Sequence[Tensor],
                valid: Optional[Sequence[Optional[Tensor]]] = None) -> dict[str, Tensor]:
        if logits.dim() == 4:
            logits = logits[:, 0]
        softs, hards = [], []
        for b, instance_map in enumerate(instance_maps):
            v = _valid_at(valid, b)
            softs.append(_soft_one_point(logits[b], instance_map, self.stride, self.temperature, v, None))
            hards.append((hard_one_point_error(logits[b], instance_map, self.stride, v), softs[-1][1]))
        one_point = _mean_defined(softs, logits)
        hard = _mean_defined(hards, logits).detach()
        return {"loss": self.weight * one_point, "one_point": one_point.detach(), "one_point_hard": hard}
