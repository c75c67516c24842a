"""RPS rewards: the IoU of each candidate's mask with its matched ground-truth instance (METHODS.md D2).

Rewards are in [0, 1]. A predicted point that matches no ground-truth instance (a false positive)
has no mask to aim for: all its candidates get `unmatched_reward` (default 0), so its group has zero
variance and `group_advantages` drops it from the GRPO loss. The optional distance penalty
subtracts ``distance_weight * min(|c - p_gt| / r, 1)`` (p_gt the matched GT point, r the point's
NNEC radius) and clamps the result back to [0, 1].
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from crowdseg.losses.mask_counting import point_instance_ids


def match_points_to_instances(points: Tensor, gt_points: Tensor, radii: Tensor,
                              instance_map: Optional[Tensor] = None) -> Tensor:
    """Match predicted points to ground-truth instances.

    points: (N, 2) xy pixels; gt_points: (M, 2) xy pixels; radii: (N,) NNEC radii of the predicted
    points; instance_map: (H, W) long (k = instance of GT point k-1) or None.
    1. A point whose pixel lies in instance k's mask matches GT k-1 (several points may share one
       instance: each still has a well-defined target mask).
    2. The remaining points are matched one-to-one (Hungarian on distance) to the GT instances not
       claimed in step 1, only where the distance is <= the point's radius.
    Returns (N,) long: the GT index, or -1 when unmatched.
    """
    n, m = points.shape[0], gt_points.shape[0]
    matched = torch.full((n,), -1, dtype=torch.long, device=points.device)
    if n == 0 or m == 0:
        return matched
    if instance_map is not None:
        ids = point_instance_ids(points, instance_map).to(points.device)
        if bool((ids > m).any()):
            raise ValueError(f"instance_map has id {int(ids.max())} but there are only {m} GT points")
        matched = ids - 1
    rest = torch.nonzero(matched < 0).flatten()
    claimed = torch.zeros(m, dtype=torch.bool, device=points.device)
    claimed[matched[matched >= 0]] = True
    free = torch.nonzero(~claimed).flatten()
    if rest.numel() == 0 or free.numel() == 0:
        return matched
    distances = torch.cdist(points[rest].detach().double(), gt_points[free].detach().double().to(points.device))
    allowed = distances <= radii[rest].detach().double().to(points.device)[:, None]
    if not bool(allowed.any()):
        return matched
    cost = torch.where(allowed, distances, torch.full_like(distances, 1e9)).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    allowed_np = allowed.cpu().numpy()
    ok = allowed_np[rows, cols]
    rows_t = torch.as_tensor(np.asarray(rows[ok]), dtype=torch.long, device=points.device)
    cols_t = torch.as_tensor(np.asarray(cols[ok]), dtype=torch.long, device=points.device)
    matched[rest[rows_t]] = free[cols_t]
    return matched


def mask_iou_with_instances(masks: Tensor, target_ids: Tensor, instance_map: Tensor,
                            offsets: Optional[Tensor] = None, chunk_size: int = 1024) -> Tensor:
    """IoU of each (possibly cropped) mask with one instance of an id map, vectorised over masks.

    masks: (M, h, w) bool, mask i covering image pixels x in [x0, x0+w), y in [y0, y0+h);
    target_ids: (M,) long instance id in `instance_map` (<= 0: none, IoU 0); instance_map: (H, W)
    long; offsets: (M, 2) long (x0, y0) top-left of each window in image pixels (None: zeros, i.e.
    full-image masks). Mask pixels outside the image are ignored; the instance's pixels outside the
    window count in the union. Processed `chunk_size` masks at a time to bound memory.
    Returns (M,) float IoU in [0, 1].
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (M, h, w), got {tuple(masks.shape)}")
    count, h, w = masks.shape
    device = masks.device
    height, width = instance_map.shape
    ids_map = instance_map.to(device=device, dtype=torch.int32)
    target = target_ids.to(device=device, dtype=torch.long)
    num_ids = max(int(ids_map.max().item()) if ids_map.numel() else 0, int(target.max().item()) if count else 0)
    areas = torch.bincount(ids_map.reshape(-1).long().clamp_min(0), minlength=num_ids + 1)
    offsets = (torch.zeros((count, 2), dtype=torch.long, device=device) if offsets is None
               else offsets.to(device=device, dtype=torch.long))
    iou = torch.zeros(count, dtype=torch.float32, device=device)
    arange_h = torch.arange(h, device=device)
    arange_w = torch.arange(w, device=device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        rows = offsets[start:stop, 1, None] + arange_h                       # (m, h)
        cols = offsets[start:stop, 0, None] + arange_w                       # (m, w)
        inside = (((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :])
        gt = ids_map[rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
        tgt = target[start:stop]
        gt_hit = (gt == tgt[:, None, None].to(torch.int32)) & inside
        mask_in = masks[start:stop].to(torch.bool) & inside
        intersection = (mask_in & gt_hit).sum(dim=(1, 2)).float()
        union = mask_in.sum(dim=(1, 2)).float() + areas[tgt.clamp_min(0)].float() - intersection
        value = torch.where(union > 0, intersection / union.clamp_min(1.0), torch.zeros_like(union))
        iou[start:stop] = torch.where(tgt > 0, value, torch.zeros_like(value))
    return iou


def candidate_rewards(masks: Tensor, matched: Tensor, instance_map: Tensor, offsets: Optional[Tensor] = None,
                      unmatched_reward: float = 0.0, distance_weight: float = 0.0,
                      candidates: Optional[Tensor] = None, gt_points: Optional[Tensor] = None,
                      radii: Optional[Tensor] = None, chunk_size: int = 1024) -> Tensor:
    """Reward of every candidate of every point, in [0, 1].

    masks: (N, K, h, w) bool, the mask prompted at candidate k of point n (cropped windows at
    `offsets` (N, K, 2) long (x0, y0), or full-image masks with offsets None); matched: (N,) long
    GT index of each point or -1 (`match_points_to_instances`); instance_map: (H, W) long.
    The distance penalty (when distance_weight > 0) needs candidates (N, K, 2), gt_points (M, 2)
    and radii (N,). Returns (N, K) float.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be (N, K, h, w), got {tuple(masks.shape)}")
    n, k, h, w = masks.shape
    matched = matched.to(masks.device).long()
    target_ids = (matched + 1).clamp_min(0)[:, None].expand(n, k).reshape(-1)
    flat_offsets = None if offsets is None else offsets.reshape(n * k, 2)
    rewards = mask_iou_with_instances(masks.reshape(n * k, h, w), target_ids, instance_map, flat_offsets,
                                      chunk_size).reshape(n, k)
    if distance_weight > 0:
        if candidates is None or gt_points is None or radii is None:
            raise ValueError("the distance penalty needs candidates, gt_points and radii")
        rewards = rewards - distance_weight * distance_penalty(candidates, matched, gt_points, radii)
    rewards = rewards.clamp(0.0, 1.0)
    unmatched = (matched < 0)[:, None].expand(n, k)
    return torch.where(unmatched, torch.full_like(rewards, float(unmatched_reward)), rewards)


def distance_penalty(candidates: Tensor, matched: Tensor, gt_points: Tensor, radii: Tensor) -> Tensor:
    """min(|c - p_gt| / r, 1) per candidate: (N, K, 2), (N,), (M, 2), (N,) -> (N, K); 0 if unmatched."""
    device = candidates.device
    matched = matched.to(device).long()
    if gt_points.shape[0] == 0:
        return torch.zeros(candidates.shape[:2], dtype=torch.float32, device=device)
    targets = gt_points.to(device=device, dtype=torch.float32)[matched.clamp_min(0)]       # (N, 2)
    distance = (candidates.float() - targets[:, None, :]).norm(dim=-1)
    scaled = (distance / radii.to(device).float().clamp_min(1e-6)[:, None]).clamp(max=1.0)
    return torch.where((matched >= 0)[:, None], scaled, torch.zeros_like(scaled))
