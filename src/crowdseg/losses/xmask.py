"""XMask's three losses as pure functions on tensors (METHODS.md A2.2-A2.4).

* `p2r_loss`: the point-to-region counting loss on a stride-4 point-logit map (phase 1, and the
  P2R part of phase 3);
* `discriminative_loss`: pull / push of the 16-d embeddings inside each predicted point's NNEC
  disc, against GT or pseudo instance masks, plus the point-mask term and invalid zones (phase 2);
* `mask_constraint_terms`: background suppression, unit mass and one point per instance on the
  logit map (phase 3). The unit-mass and one-point math is `losses/mask_counting.py`'s; the
  published one-point term (a count of upsampled pixels, zero gradient) is returned as a metric
  and the loss uses the soft per-cell version `soft_one_point_loss`.

The `nn.Module` wrappers at the end loop over the images of a batch and average as the published
code does (sum over images / batch size). Every value that has nothing to average over is a 0
attached to the graph, so backward always reaches the inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crowdseg.losses.mask_counting import (cell_centers, density_at_mask_resolution, background_suppression_loss,
                                           soft_one_point_loss, sum_per_instance, unit_mass_loss)
from crowdseg.xmask.discs import (MIN_RADIUS, disc_pixel_pairs, embedding_at_image_resolution, gaussian_smooth,
                                  nn_radii, own_pixels, pair_distances, sample_centres)


def _zero(t: Tensor) -> Tensor:
    return t.sum() * 0.0


# -------------------------------------------------------------------------------------------- P2R
def nearest_point(cells: Tensor, points: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Distance to and index of the nearest point for every cell: (M, 2), (N, 2) -> (M,), (M,) long.

    Chunked over cells, so memory is O(chunk * N)."""
    dists, index = [], []
    for start in range(0, cells.shape[0], chunk):
        d, i = torch.cdist(cells[start:start + chunk], points).min(dim=1)
        dists.append(d)
        index.append(i)
    return torch.cat(dists), torch.cat(index)


@torch.no_grad()
def p2r_targets(logits: Tensor, points: Tensor, stride: int, min_radius: float = 8.0, max_radius: float = 96.0,
                cost_point: float = 8.0, cost_class: float = 1.0) -> Tensor:
    """The P2R target map: one positive cell per point (METHODS.md A2.2).

    logits: (h, w); points: (N, 2) xy in pixels. Each cell (centre j*stride + (stride-1)/2) is
    assigned to its nearest point when closer than `max_radius`; R_g = the largest distance among
    the cells of point g, clipped to [min_radius, max_radius]; the target of g is its assigned cell
    minimising cost_point * d / R_g - cost_class * logit (first cell on ties). Returns (h, w) float
    0/1. A point with no assigned cell has no target.
    """
    h, w = logits.shape[-2:]
    target = torch.zeros(h * w, device=logits.device, dtype=logits.dtype)
    n = points.shape[0]
    if n == 0:
        return target.view(h, w)
    cells = cell_centers(h, w, stride, device=logits.device)
    d, g = nearest_point(cells, points.to(cells))
    assigned = d < max_radius
    if not bool(assigned.any()):
        return target.view(h, w)
    radius = torch.zeros(n, device=logits.device).scatter_reduce(0, g[assigned], d[assigned], reduce="amax")
    radius = radius.clamp(min_radius, max_radius)
    cost = cost_point * d / radius[g] - cost_class * logits.reshape(-1).float()
    idx = torch.arange(h * w, device=logits.device)
    ga, ca, ia = g[assigned], cost[assigned], idx[assigned]
    best = torch.full((n,), float("inf"), device=logits.device).scatter_reduce(0, ga, ca, reduce="amin")
    at_best = ca <= best[ga]
    first = torch.full((n,), h * w, dtype=torch.long, device=logits.device)
    first = first.scatter_reduce(0, ga[at_best], ia[at_best], reduce="amin")
    target[first[first < h * w]] = 1.0
    return target.view(h, w)


def p2r_loss(logits: Tensor, points: Tensor, stride: int, weight: Optional[Tensor] = None, **target_options) -> Tensor:
    """P2R loss of one image: mean over cells of BCE-with-logits(A, T) * (T + 1) * weight.

    logits: (h, w) or (1, h, w); points: (N, 2) xy; weight: optional (h, w) float / bool (0 drops a
    cell: erased by cutout, padding). With no point, BCE(A, 0) weighted 0.5. The mean is over all
    cells (XMask's normalisation), weighted or not. Returns a scalar.
    """
    a = logits.reshape(logits.shape[-2:])
    if points.shape[0] == 0:
        w = torch.full_like(a, 0.5)
        target = torch.zeros_like(a)
    else:
        target = p2r_targets(a, points, stride, **target_options)
        w = target + 1.0
    if weight is not None:
        w = w * weight.to(w.dtype)
    return F.binary_cross_entropy_with_logits(a, target, weight=w)


# ------------------------------------------------------------------------------ discriminative loss
def point_mask_term(points: Tensor, instance_map: Tensor, region: Optional[Tensor] = None,
                    invalid: Optional[Tensor] = None, scores: Optional[Tensor] = None) -> Tensor:
    """XMask's point-mask consistency term of one image (A2.3 step 8).

    (number of points on background inside `region` and outside `invalid`, + 1 when the valid
    region is not empty and holds no point) / (max(N, 1) + max(#foreground ids in region, 1)).
    points: (N, 2) xy (rounded, clamped into the image); instance_map: (H, W) long; region,
    invalid: (H, W) bool. With `scores` (N,) each background point counts its score instead of 1,
    which makes the term differentiable w.r.t. the scores (the published term is a constant).
    """
    H, W = instance_map.shape
    device = instance_map.device
    region = torch.ones((H, W), dtype=torch.bool, device=device) if region is None else region.bool()
    invalid = torch.zeros((H, W), dtype=torch.bool, device=device) if invalid is None else invalid.bool()
    allowed = region & ~invalid
    rows, cols = own_pixels(points, (H, W))
    on_bg = allowed[rows, cols] & (instance_map[rows, cols] == 0)
    if scores is None:
        value = on_bg.float().sum()
    else:
        value = (scores.reshape(-1) * on_bg.to(scores.dtype)).sum()
    if bool(allowed.any()) and not bool(allowed[rows, cols].any()):
        value = value + 1.0
    fg_ids = torch.unique(instance_map[region & (instance_map > 0)]).numel()
    return value / float(max(points.shape[0], 1) + max(fg_ids, 1))


def discriminative_loss(embedding: Tensor, points: Tensor, instance_map: Tensor, region: Optional[Tensor] = None,
                        invalid: Optional[Tensor] = None, point_scores: Optional[Tensor] = None,
                        tau: float = 0.6, margin: float = 0.1, point_mask_weight: float = 1.0,
                        min_radius: float = MIN_RADIUS, max_radius_factor: float = 0.5, kernel_size: int = 7,
                        sigma: float = 1.5) -> dict[str, Tensor]:
    """XMask's discriminative (pull / push) loss of one image (METHODS.md A2.3).

    embedding: (D, H, W) at image resolution (`embedding_at_image_resolution`), not yet smoothed;
    points: (N, 2) xy predicted points (positions not differentiated); instance_map: (H, W) long GT
    or pseudo ids; region: (H, W) bool, where the image is seen (cutout erases the rest; default all);
    invalid: (H, W) bool zones around unsure teacher points (excluded from discs and the point-mask
    term); point_scores: optional (N,) probabilities for a differentiable point-mask term.

    With d(x) = ||E(x) - e_i|| on the smoothed embedding, e_i sampled at p_i's pixel, and the disc
    D_i of radius r_i (NN distance among the points, clamped to [min_radius, factor * min(H, W)],
    a lone point gets factor * min(H, W)) inside `region` and outside `invalid`:
    pull_i = mean over D_i with M = id_i of [d - (tau - m)]+, push_i = mean over D_i with M != id_i
    of [(tau + 4m) - d]+; points on background (id_i = 0) or outside the region are skipped;
    averaged over points with a non-empty pull set. Returns {"loss" = pull + push + w * point_mask,
    "pull", "push", "point_mask", "points" (kept points)}, the last four detached.
    """
    D, H, W = embedding.shape
    device = embedding.device
    region = torch.ones((H, W), dtype=torch.bool, device=device) if region is None else region.bool().to(device)
    invalid = None if invalid is None else invalid.bool().to(device)
    ids_map = instance_map.to(device).long()
    pm = point_mask_term(points, ids_map, region, invalid, point_scores) if point_mask_weight > 0 else None
    zero = _zero(embedding)
    out = {"pull": zero.detach(), "push": zero.detach(), "points": zero.detach(),
           "point_mask": (pm if pm is not None else zero).detach()}
    base = zero + (point_mask_weight * pm if pm is not None else 0.0)
    n = points.shape[0]
    if n == 0:
        return {"loss": base, **out}
    rows, cols = own_pixels(points, (H, W))
    ids = ids_map[rows, cols]
    keep = (ids > 0) & region[rows, cols]
    if not bool(keep.any()):
        return {"loss": base, **out}
    max_r = max_radius_factor * min(H, W)
    radii = nn_radii(points, (H, W), min_radius, max_r, lone_radius=max_r)
    kept = torch.nonzero(keep).squeeze(1)
    pts, radii, ids = points[kept], radii[kept], ids[kept]
    emb = gaussian_smooth(embedding, kernel_size, sigma)
    owner, pixel, _ = disc_pixel_pairs(pts, radii, (H, W))
    allowed = region.reshape(-1)[pixel]
    if invalid is not None:
        allowed = allowed & ~invalid.reshape(-1)[pixel]
    owner, pixel = owner[allowed], pixel[allowed]
    centres = sample_centres(emb, pts)
    d = pair_distances(emb, centres, owner, pixel)
    same = ids_map.reshape(-1)[pixel] == ids[owner]
    k = pts.shape[0]
    pull_v = torch.clamp(d - (tau - margin), min=0.0) * same
    push_v = torch.clamp((tau + 4 * margin) - d, min=0.0) * ~same
    pos_n = torch.bincount(owner[same], minlength=k).to(d.dtype)
    neg_n = torch.bincount(owner[~same], minlength=k).to(d.dtype)
    pull = d.new_zeros(k).index_add(0, owner, pull_v) / pos_n.clamp_min(1.0)
    push = d.new_zeros(k).index_add(0, owner, push_v) / neg_n.clamp_min(1.0)
    valid = pos_n > 0
    if not bool(valid.any()):
        return {"loss": base + _zero(d), **out}
    pull, push = pull[valid].mean(), push[valid].mean()
    out.update(pull=pull.detach(), push=push.detach(), points=pull.new_tensor(float(valid.sum())))
    return {"loss": base + pull + push, **out}


# ------------------------------------------------------------------------------- mask constraint
def upsample_cells(logits: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Plain bilinear upsampling of an (h, w) cell map to the image grid (h*stride, w*stride), cut or
    zero-padded to `size` (H, W) (no mass rescaling; XMask's `up`)."""
    h, w = logits.shape[-2:]
    up = F.interpolate(logits.reshape(1, 1, h, w), size=(h * stride, w * stride), mode="bilinear",
                       align_corners=False)[0, 0]
    H, W = size
    up = up[:H, :W]
    if up.shape[0] < H or up.shape[1] < W:
        up = F.pad(up, (0, W - up.shape[1], 0, H - up.shape[0]))
    return up


@torch.no_grad()
def published_one_point_error(logits: Tensor, instance_map: Tensor, stride: int,
                              valid: Optional[Tensor] = None) -> Tensor:
    """XMask's one-point value: mean over valid instances of |#{pixels of M_k with up(x) > 0} - 1|,
    with `up` the bilinearly upsampled logits (pixels, not cells). A metric: its gradient is zero."""
    k = int(valid.numel()) if valid is not None else int(instance_map.max().item()) if instance_map.numel() else 0
    if k == 0:
        return logits.new_zeros(())
    up = upsample_cells(logits, tuple(instance_map.shape), stride)
    counts, areas = sum_per_instance((up > 0).float().reshape(-1), instance_map.reshape(-1).long(), k)
    keep = areas > 0
    if valid is not None:
        keep = keep & valid.bool().to(keep.device)
    if not bool(keep.any()):
        return logits.new_zeros(())
    return (counts[keep] - 1.0).abs().mean()


def mask_constraint_terms(logits: Tensor, instance_map: Tensor, stride: int, valid: Optional[Tensor] = None,
                          region: Optional[Tensor] = None, temperature: float = 1.0) -> dict[str, Tensor]:
    """The mask-constraint terms of one image (METHODS.md A2.4).

    logits: (h, w) or (1, h, w) point logits at `stride`; instance_map: (H, W) long; valid: (K,) bool
    instances to constrain (id k + 1; default all); region: (H, W) bool, where background is
    penalised (cutout erases the rest).
    - background: mean of relu(up) over background pixels in `region` (up: plain bilinear
      upsampling, as published);
    - unit_mass: mean over valid instances of |sum_{M_k} relu(s * up) - 1|, s = sum relu(A) / sum
      relu(up) detached (`mask_counting.density_at_mask_resolution`);
    - one_point: mean over valid instances of |sum_{cells c in M_k} sigmoid(A_c / T) - 1|
      (`mask_counting.soft_one_point_loss`, differentiable);
    - one_point_published: XMask's pixel count (detached, a metric).
    Returns those four scalars (0 when undefined).
    """
    a = logits.reshape(logits.shape[-2:])
    size = tuple(instance_map.shape)
    m = instance_map.long().to(a.device)
    up = upsample_cells(a, size, stride)
    scaled = density_at_mask_resolution(a, size, stride)
    k = int(valid.numel()) if valid is not None else None
    return {"background": background_suppression_loss(up, m, region),
            "unit_mass": unit_mass_loss(scaled, m, valid, k),
            "one_point": soft_one_point_loss(a, m, stride, temperature, valid, k),
            "one_point_published": published_one_point_error(a, m, stride, valid)}


# ------------------------------------------------------------------------------------- nn.Modules
class P2RLoss(nn.Module):
    """forward(logits (B, 1, h, w), points: B tensors (N_b, 2) xy, weights: optional (B, h, w)) ->
    mean over images of `p2r_loss`."""

    def __init__(self, stride: int = 4, min_radius: float = 8.0, max_radius: float = 96.0, cost_point: float = 8.0,
                 cost_class: float = 1.0):
        super().__init__()
        self.stride = int(stride)
        self.options = dict(min_radius=min_radius, max_radius=max_radius, cost_point=cost_point, cost_class=cost_class)

    def forward(self, logits: Tensor, points: Sequence[Tensor], weights: Optional[Tensor] = None) -> Tensor:
        total = _zero(logits)
        for b, pts in enumerate(points):
            w = None if weights is None else weights[b]
            total = total + p2r_loss(logits[b], pts.to(logits.device), self.stride, w, **self.options)
        return total / max(len(points), 1)


class DiscriminativeLoss(nn.Module):
    """forward(embedding (B, D, h, w) at `stride`, points: B tensors (N_b, 2) xy, instance_maps: B
    (H_b, W_b) long, regions / invalid: optional B (H_b, W_b) bool, point_scores: optional B (N_b,))
    -> {"loss", "pull", "push", "point_mask", "points"}: sums over images / B (XMask's average)."""

    def __init__(self, stride: int = 4, tau: float = 0.6, margin: float = 0.1, point_mask_weight: float = 1.0,
                 min_radius: float = MIN_RADIUS, max_radius_factor: float = 0.5, kernel_size: int = 7,
                 sigma: float = 1.5):
        super().__init__()
        self.stride = int(stride)
        self.options = dict(tau=tau, margin=margin, point_mask_weight=point_mask_weight, min_radius=min_radius,
                            max_radius_factor=max_radius_factor, kernel_size=kernel_size, sigma=sigma)

    def forward(self, embedding: Tensor, points: Sequence[Tensor], instance_maps: Sequence[Tensor],
                regions: Optional[Sequence[Optional[Tensor]]] = None, invalid: Optional[Sequence[Optional[Tensor]]] = None,
                point_scores: Optional[Sequence[Optional[Tensor]]] = None) -> dict[str, Tensor]:
        keys = ("loss", "pull", "push", "point_mask", "points")
        total = {k: _zero(embedding) for k in keys}
        for b, m in enumerate(instance_maps):
            emb = embedding_at_image_resolution(embedding[b], tuple(m.shape), self.stride)
            terms = discriminative_loss(emb, points[b], m, None if regions is None else regions[b],
                                        None if invalid is None else invalid[b],
                                        None if point_scores is None else point_scores[b], **self.options)
            total = {k: total[k] + terms[k] for k in keys}
        n = max(len(instance_maps), 1)
        return {k: (v / n if k == "loss" else (v / n).detach()) for k, v in total.items()}


class MaskConstraintLoss(nn.Module):
    """forward(logits (B, 1, h, w), instance_maps: B (H_b, W_b) long, valid: optional B (K_b,) bool,
    regions: optional B (H_b, W_b) bool) -> {"loss" = bg_w * background + fg_w * unit_mass +
    op_w * one_point, "background", "unit_mass", "one_point", "one_point_published"}: sums over
    images / B. The P2R term of XMask's p2r_mc mode is added by the caller."""

    def __init__(self, stride: int = 4, background_weight: float = 0.0, mass_weight: float = 0.005,
                 one_point_weight: float = 0.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.stride = int(stride)
        self.weights = {"background": float(background_weight), "unit_mass": float(mass_weight),
                        "one_point": float(one_point_weight)}
        self.temperature = float(temperature)

    def forward(self, logits: Tensor, instance_maps: Sequence[Tensor], valid: Optional[Sequence[Optional[Tensor]]] = None,
                regions: Optional[Sequence[Optional[Tensor]]] = None) -> dict[str, Tensor]:
        keys = ("background", "unit_mass", "one_point", "one_point_published")
        total = {k: _zero(logits) for k in keys}
        for b, m in enumerate(instance_maps):
            terms = mask_constraint_terms(logits[b], m.to(logits.device), self.stride,
                                          None if valid is None else valid[b], None if regions is None else regions[b],
                                          self.temperature)
            total = {k: total[k] + terms[k] for k in keys}
        n = max(len(instance_maps), 1)
        total = {k: v / n for k, v in total.items()}
        loss = sum(self.weights[k] * total[k] for k in self.weights)
        return {"loss": loss, **{k: v.detach() for k, v in total.items()}}
