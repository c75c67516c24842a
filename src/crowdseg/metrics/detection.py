"""Box AP and the predicted-mask overlap degree, as torchmetrics `Metric`s (DDP-safe).

- `BoxAP`: COCO box AP / AP50 / AP75 / APs/m/l with crowd-sized maxDets (faster-coco-eval, the same
  protocol as `mask_ap.coco_mask_ap`); per-image rows are gathered from every rank.
- `MaskOverlap`: the quantity OverlapLoss targets, on the predicted binary masks: for every kept
  detection i, sum_{j != i} |m_i & m_j| / (|m_i| + |m_j|) (`overlap_sums`); the metric is the mean over
  detections ("overlap") plus the fraction of detections overlapping any other ("overlapping").
- `PairedMaskIoU`: the mean IoU of masks predicted for known instances (one per ground-truth box)
  with those instances' masks: what BoxInst's box losses learn, measured apart from detection.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from crowdseg.metrics.mask_ap import AP_KEYS, DEFAULT_MAX_DETS, PERSON_CATEGORY, summarize_coco_eval
from crowdseg.metrics.torch_metrics import _gather_any


def overlap_sums(masks: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(K,) sum over j != i of |m_i & m_j| / (|m_i| + |m_j|) of binary masks (K, H, W).

    In [0, 0.5 (K - 1)]; 0 for pairwise disjoint masks. Computed in row chunks of `chunk` masks.
    """
    k = masks.shape[0]
    if k < 2:
        return torch.zeros(k, dtype=torch.float64, device=masks.device)
    flat = masks.reshape(k, -1).float()
    areas = flat.sum(1)
    out = torch.zeros(k, dtype=torch.float64, device=masks.device)
    for start in range(0, k, chunk):
        inter = flat[start:start + chunk] @ flat.T                                  # (c, K)
        degree = inter / (areas[start:start + chunk, None] + areas[None, :]).clamp_min(1.0)
        rows = torch.arange(start, min(start + chunk, k), device=masks.device)
        degree[rows - start, rows] = 0.0
        out[start:start + chunk] = degree.sum(1).double()
    return out


class MaskOverlap(Metric):
    """Mean over predicted masks of their summed overlap degree with the other masks of their image.

    `update(masks_per_image)`: a list of (K, H, W) bool masks (the detections one keeps, e.g. score
    >= a threshold). `compute()` -> {"overlap": mean sum, "overlapping": fraction with any overlap,
    "detections": mean per image}.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("total", "overlapping", "count", "images"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, masks_per_image: Sequence[torch.Tensor]) -> None:
        for masks in masks_per_image:
            sums = overlap_sums(masks.to(self.device))
            self.total += sums.sum()
            self.overlapping += (sums > 0).sum()
            self.count += sums.numel()
            self.images += 1

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp_min(1)
        return {"overlap": self.total / n, "overlapping": self.overlapping / n,
                "detections": self.count / self.images.clamp_min(1)}


def paired_mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(G,) IoU of pred[k] with gt[k]; pred, gt (G, H, W) bool. 0 where both are empty."""
    p, g = pred.flatten(1), gt.flatten(1)
    inter = (p & g).sum(1).double()
    union = (p | g).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


class PairedMaskIoU(Metric):
    """Mean IoU of predicted masks with the ground-truth masks they were predicted for.

    `update(preds, targets)`: per image, (G, H, W) bool masks, row k predicted for ground-truth row k.
    Instances whose ground-truth mask is empty (wholly hidden by others in an id map) are left out.
    `compute()` -> {"<prefix>mask_iou": mean over instances, "<prefix>instances": their number}.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prefix = prefix
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        for pred, gt in zip(preds, targets):
            if pred.shape != gt.shape:
                raise ValueError(f"predicted masks {tuple(pred.shape)} differ from the targets {tuple(gt.shape)}")
            present = gt.flatten(1).any(1)
            self.iou_sum += paired_mask_iou(pred[present].to(self.device), gt[present].to(self.device)).sum()
            self.count += present.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}mask_iou": self.iou_sum / self.count.clamp_min(1), f"{self.prefix}instances": self.count}


class BoxAP(Metric):
    """COCO box AP over the set: `update(pred_boxes, pred_scores, gt_boxes)`, per image lists of
    (K, 4) xyxy, (K,), (G, 4) xyxy. `compute()` -> {"box_ap", "box_ap50", "box_ap75", "box_aps",
    "box_apm", "box_apl"} (fractions; -1 where there is no GT in the area range)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, max_dets: Sequence[int] = DEFAULT_MAX_DETS, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", _gather_any)
        super().__init__(**kwargs)
        self.max_dets = tuple(int(m) for m in max_dets)
        # rows (image, x0, y0, x1, y1, score, is_gt); `images` counts the images of this rank
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("image_keys", default=[], dist_reduce_fx="cat")

    def update(self, pred_boxes: Sequence[torch.Tensor], pred_scores: Sequence[torch.Tensor],
               gt_boxes: Sequence[torch.Tensor]) -> None:
        for boxes, scores, gt in zip(pred_boxes, pred_scores, gt_boxes):
            # a key unique across ranks and updates: (rank, running index)
            key = float(torch.distributed.get_rank() if torch.distributed.is_available()
                        and torch.distributed.is_initialized() else 0) * 1e7 + len(self.image_keys)
            dt = torch.cat([boxes.double().reshape(-1, 4), scores.double().reshape(-1, 1),
                            torch.zeros(len(boxes), 1, dtype=torch.float64, device=boxes.device)], 1)
            g = torch.cat([gt.double().reshape(-1, 4), torch.ones(len(gt), 2, dtype=torch.float64, device=gt.device)], 1)
            rows = torch.cat([dt.to(self.device), g.to(self.device)])
            self.rows.append(torch.cat([torch.full((len(rows), 1), key, dtype=torch.float64, device=self.device), rows], 1))
            self.image_keys.append(torch.tensor([key], dtype=torch.float64, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        keys = [] if isinstance(self.image_keys, list) and not self.image_keys else dim_zero_cat(self.image_keys).tolist()
        if not keys:
            return {f"box_{k}": torch.tensor(-1.0, dtype=torch.float64) for k in AP_KEYS}
        rows = dim_zero_cat(self.rows).cpu().numpy() if not (isinstance(self.rows, list) and not self.rows) \
            else np.zeros((0, 7))
        ids = {key: i + 1 for i, key in enumerate(sorted(set(keys)))}
        images = [{"id": i, "height": 1, "width": 1} for i in ids.values()]
        annotations, detections = [], []
        for r in rows:
            x0, y0, x1, y1 = (float(v) for v in r[1:5])
            box = [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)]
            if r[6] == 1:
                annotations.append({"id": len(annotations) + 1, "image_id": ids[r[0]], "category_id": 1, "bbox": box,
                                    "area": box[2] * box[3], "iscrowd": 0})
            else:
                detections.append({"image_id": ids[r[0]], "category_id": 1, "bbox": box, "score": float(r[5])})
        return {f"box_{k}": torch.tensor(v, dtype=torch.float64)
                for k, v in coco_box_ap(images, annotations, detections, self.max_dets).items() if k in AP_KEYS}


def coco_box_ap(images: list[dict], annotations: list[dict], detections: list[dict],
                max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> dict[str, float]:
    """COCO bbox evaluation (faster-coco-eval) of `detections` against `annotations` (COCO dicts)."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    def coco(dataset: dict) -> Any:
        c = FasterCOCO()
        c.print_function = lambda *a, **k: None
        c.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            c.createIndex()
        return c

    gt = coco({"images": images, "annotations": annotations, "categories": [dict(PERSON_CATEGORY)]})
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(detections))
    else:
        dt = coco({"images": copy.deepcopy(images), "annotations": [], "categories": [dict(PERSON_CATEGORY)]})
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
    ev.params.maxDets = sorted(int(m) for m in max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return summarize_coco_eval(ev)
