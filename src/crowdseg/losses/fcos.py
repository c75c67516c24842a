"""FCOS targets and detection losses (METHODS.md B4 "FCOS defaults"): pure functions on tensors.

Locations are the centres of the feature-map cells of every level, flattened level after level:
`locations` (M, 2) xy input pixels, `levels` (M,) long, `strides` per level. One class (person)
by default; boxes are xyxy input pixels.

- `fcos_targets`: each location takes the smallest-area GT box that contains it, whose centre
  region (radius * stride, clipped to the box) contains it, and whose largest regression distance
  lies in the location's size-of-interest range. Locations inside an ignore box (CrowdHuman `mask`
  regions) that are not positive are ignored by the classification loss.
- `fcos_losses`: sigmoid focal loss (alpha 0.25, gamma 2) / #positives, GIoU loss weighted by the
  centre-ness target, centre-ness BCE / #positives (torchvision's `sigmoid_focal_loss`,
  `generalized_box_iou_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from crowdseg.models.fcos_geometry import DEFAULT_SIZES_OF_INTEREST, INF, decode_boxes, level_ranges  # noqa: F401 (re-exported)


@dataclass
class FcosTargets:
    """Per-location targets of one image (M locations).

    labels: (M,) long, the class of a positive location, -1 background, -2 ignored;
    gt_index: (M,) long, the matched GT box (-1 if none); boxes: (M, 4) the matched GT box xyxy;
    ltrb: (M, 4) its regression distances in pixels; centerness: (M,) in [0, 1].
    """
    labels: torch.Tensor
    gt_index: torch.Tensor
    boxes: torch.Tensor
    ltrb: torch.Tensor
    centerness: torch.Tensor


@torch.no_grad()
def fcos_targets(locations: torch.Tensor, levels: torch.Tensor, strides: Sequence[int], gt_boxes: torch.Tensor,
                 gt_labels: Optional[torch.Tensor] = None, ignore_boxes: Optional[torch.Tensor] = None,
                 sizes_of_interest: Sequence[float] = DEFAULT_SIZES_OF_INTEREST,
                 center_radius: float = 1.5) -> FcosTargets:
    """FCOS assignment of one image: locations (M, 2), levels (M,), gt_boxes (G, 4) xyxy, gt_labels (G,)
    (default 0), ignore_boxes (K, 4) or None. `center_radius` <= 0 disables centre sampling."""
    m, device = locations.shape[0], locations.device
    g = gt_boxes.shape[0]
    labels = torch.full((m,), -1, dtype=torch.long, device=device)
    if g == 0:
        zeros = locations.new_zeros(m, 4)
        targets = FcosTargets(labels, torch.full((m,), -1, dtype=torch.long, device=device), zeros, zeros,
                              locations.new_zeros(m))
        return _ignore(targets, locations, ignore_boxes)
    boxes = gt_boxes.float().to(device)
    x, y = locations[:, 0:1], locations[:, 1:2]                                   # (M, 1)
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # (M, G, 4)
    if center_radius > 0:
        stride = torch.as_tensor(strides, dtype=torch.float32, device=device)[levels][:, None] * center_radius
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        x0, y0 = torch.maximum(cx - stride, boxes[:, 0]), torch.maximum(cy - stride, boxes[:, 1])
        x1, y1 = torch.minimum(cx + stride, boxes[:, 2]), torch.minimum(cy + stride, boxes[:, 3])
        inside = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2).amin(dim=2) > 0
    else:
        inside = ltrb.amin(dim=2) > 0
    ranges = level_ranges(len(strides), sizes_of_interest).to(device)[levels]      # (M, 2)
    largest = ltrb.amax(dim=2)
    in_level = (largest >= ranges[:, 0:1]) & (largest <= ranges[:, 1:2])
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(m, g).clone()
    areas[~(inside & in_level)] = INF
    best_area, gt_index = areas.min(dim=1)
    positive = best_area < INF
    gt_index = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    cls = gt_labels.to(device).long() if gt_labels is not None else torch.zeros(g, dtype=torch.long, device=device)
    labels[positive] = cls[gt_index[positive]]
    safe = gt_index.clamp_min(0)
    matched_ltrb = ltrb[torch.arange(m, device=device), safe]
    lr, tb = matched_ltrb[:, 0::2], matched_ltrb[:, 1::2]
    centerness = torch.sqrt((lr.amin(1) / lr.amax(1).clamp_min(1e-6)).clamp_min(0)
                            * (tb.amin(1) / tb.amax(1).clamp_min(1e-6)).clamp_min(0))
    centerness = torch.where(positive, centerness, torch.zeros_like(centerness))
    targets = FcosTargets(labels, gt_index, boxes[safe], matched_ltrb, centerness)
    return _ignore(targets, locations, ignore_boxes)


def _ignore(targets: FcosTargets, locations: torch.Tensor, ignore_boxes: Optional[torch.Tensor]) -> FcosTargets:
    if ignore_boxes is None or len(ignore_boxes) == 0:
        return targets
    ib = ignore_boxes.float().to(locations.device)
    x, y = locations[:, 0:1], locations[:, 1:2]
    inside = ((x >= ib[:, 0]) & (x <= ib[:, 2]) & (y >= ib[:, 1]) & (y <= ib[:, 3])).any(dim=1)
    targets.labels[inside & (targets.labels == -1)] = -2
    return targets


def fcos_losses(cls_logits: torch.Tensor, box_ltrb: torch.Tensor, ctrness_logits: torch.Tensor,
                locations: torch.Tensor, targets: Sequence[FcosTargets], num_positives: Optional[float] = None,
                alpha: float = 0.25, gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """FCOS losses of a batch.

    cls_logits: (B, M, C); box_ltrb: (B, M, 4) predicted distances in pixels (>= 0); ctrness_logits:
    (B, M); locations: (M, 2); targets: one `FcosTargets` per image. `num_positives`: the
    normaliser (e.g. the mean over DDP ranks; default: this batch's count).
    Returns {"cls", "box", "ctrness", "num_pos"} (scalars; ignored locations drop out of "cls").
    """
    b, m, c = cls_logits.shape
    labels = torch.stack([t.labels for t in targets])                         # (B, M)
    centerness = torch.stack([t.centerness for t in targets])
    ltrb_t = torch.stack([t.ltrb for t in targets])
    positive = labels >= 0
    count = positive.sum()
    norm = max(float(num_positives if num_positives is not None else count), 1.0)
    onehot = torch.zeros_like(cls_logits)
    onehot[positive] = F.one_hot(labels[positive], c).to(cls_logits.dtype)
    cared = (labels != -2).to(cls_logits.dtype)[..., None]
    cls = (sigmoid_focal_loss(cls_logits, onehot, alpha, gamma, reduction="none") * cared).sum() / norm
    if count == 0:
        zero = box_ltrb.sum() * 0.0 + ctrness_logits.sum() * 0.0
        return {"cls": cls, "box": zero, "ctrness": zero, "num_pos": cls.new_tensor(0.0)}
    loc = locations[None].expand(b, m, 2)[positive]
    pred_boxes = decode_boxes(loc, box_ltrb[positive])
    gt_boxes = decode_boxes(loc, ltrb_t[positive])
    weights = centerness[positive]
    giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
    box = (giou * weights).sum() / weights.sum().clamp_min(1e-6)
    ctr = F.binary_cross_entropy_with_logits(ctrness_logits[positive], weights, reduction="sum") / norm
    return {"cls": cls, "box": box, "ctrness": ctr, "num_pos": count.to(cls.dtype)}
