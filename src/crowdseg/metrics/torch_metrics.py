"""torchmetrics `Metric`s over the pure metric functions, for `validate` / `test` under DDP.

Each `compute()` returns a flat dict of scalar tensors, ready for
`self.log_dict({f"val/{k}": v for k, v in metric.compute().items()})`; torchmetrics
synchronises the states across ranks inside `compute()`.

- `CountingMetrics`, `LocalizationMetrics`, `InstanceIoU`: summed states (dist_reduce_fx="sum"),
  so the synchronised value equals the single-process value exactly.
- `MaskAP`: keeps per-image RLEs, scores and GT (serialised to bytes) and gathers them from every
  rank before one COCO evaluation; the image order across ranks does not change the result.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from crowdseg.metrics._arrays import as_numpy, as_points
from crowdseg.metrics.counting import counting_from_sums, counting_sums
from crowdseg.metrics.instance_iou import matched_iou_sum
from crowdseg.metrics.localization import (DEFAULT_FIXED_RADII, NUM_LEVELS, THRESHOLD_NAMES, LocalizationCounts,
                                           flatten_summary, localization_counts, localization_summary,
                                           resolve_radii_and_levels)
from crowdseg.metrics.mask_ap import (AP_KEYS, BACKENDS, DEFAULT_MAX_DETS, build_coco_gt, coco_mask_ap, id_map_to_rles,
                                      masks_to_rles)
from crowdseg.metrics.matching import matching_function


def _scalars(values: dict[str, float]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


class CountingMetrics(Metric):
    """MAE, RMSE (also as "mse", the papers' name for it) and NAE over the whole set.

    `update(pred_counts, gt_counts)`: (B,) counts of a batch. `compute()` -> {"mae", "rmse",
    "mse", "nae"} (see `counting.py`).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("abs_error", "sq_error", "images", "rel_error", "nonzero_images"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_counts: Any, gt_counts: Any) -> None:
        for name, value in counting_sums(pred_counts, gt_counts).items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, torch.Tensor]:
        return _scalars(counting_from_sums(float(self.abs_error), float(self.sq_error), float(self.images),
                                           float(self.rel_error), float(self.nonzero_images)))


class LocalizationMetrics(Metric):
    """NWPU-protocol localization precision / recall / F1 at sigma_s and sigma_l (`localization.py`).

    `update(preds, targets, radii=None, boxes=None, levels=None)`: per-image lists of predicted
    points (P_b, 2) and GT points (G_b, 2), xy in the same pixel frame; optional per image radii
    (G_b, 2) [sigma_s, sigma_l], head boxes (G_b, 4) xyxy (radii and levels follow from them),
    levels (G_b,). Without radii or boxes, `fixed_radii` (default 4 and 8 px) are sigma_s and
    sigma_l. `matching`: "hopcroft-karp" (default, guaranteed O(E sqrt V)) or "official" (the
    NWPU code's tie-breaking, for per-level numbers identical to it). `compute()` -> {"sigma_s_precision", "sigma_s_recall", "sigma_s_f1",
    "sigma_s_tp/fp/fn", "sigma_s_recall_level0".."5", "sigma_s_recall_level_mean", and the same
    for "sigma_l" (the main score)}, each key after `prefix`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, fixed_radii: Optional[Sequence[float]] = DEFAULT_FIXED_RADII,
                 num_levels: int = NUM_LEVELS, matching: str = "hopcroft-karp", prefix: str = "",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        matching_function(matching)  # fail early on an unknown name
        self.prefix = prefix  # key prefix, e.g. "orig_" for the scores in original-image pixels
        self.matching = matching
        self.fixed_radii = None if fixed_radii is None else tuple(float(r) for r in fixed_radii)
        self.num_levels = num_levels
        t = len(THRESHOLD_NAMES)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(t, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("tp_level", "fn_level"):
            self.add_state(name, default=torch.zeros(t, num_levels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Any], targets: Sequence[Any], radii: Optional[Sequence[Any]] = None,
               boxes: Optional[Sequence[Any]] = None, levels: Optional[Sequence[Any]] = None) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        t = len(THRESHOLD_NAMES)
        total = LocalizationCounts.zeros(t, self.num_levels)
        for b, (pred, gt) in enumerate(zip(preds, targets)):
            gt = as_points(gt)
            r, lv = resolve_radii_and_levels(gt.shape[0], None if radii is None else radii[b],
                                             None if boxes is None else boxes[b], self.fixed_radii)
            if levels is not None and levels[b] is not None:
                lv = as_numpy(levels[b], np.int64).reshape(-1)
            if gt.shape[0] == 0:
                r = np.zeros((0, t))
            if r.shape[1] != t:
                raise ValueError(f"radii must have {t} columns (sigma_s, sigma_l), got {r.shape[1]}")
            total = total + localization_counts(pred, gt, r, lv, self.num_levels, self.matching)
        for name in ("tp", "fp", "fn", "tp_level", "fn_level"):
            state = getattr(self, name)
            state += torch.as_tensor(getattr(total, name), device=state.device)

    def counts(self) -> LocalizationCounts:
        """The summed counts as numpy arrays (this rank's unless called inside `compute`)."""
        return LocalizationCounts(*(as_numpy(getattr(self, n), np.int64)
                                    for n in ("tp", "fp", "fn", "tp_level", "fn_level")))

    def compute(self) -> dict[str, torch.Tensor]:
        return _scalars({self.prefix + k: v for k, v in flatten_summary(localization_summary(self.counts())).items()})


class InstanceIoU(Metric):
    """Mean IoU_C = sum of Hungarian-matched IoUs / number of GT instances (`instance_iou.py`).

    `update(pred_maps, gt_maps)`: per-image (H, W) integer id maps, 0 background.
    `compute()` -> {"mean_iou_c", "gt_instances", "pred_instances"}.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gt_instances", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("pred_instances", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_maps: Sequence[Any], gt_maps: Sequence[Any]) -> None:
        if len(pred_maps) != len(gt_maps):
            raise ValueError(f"{len(pred_maps)} predicted maps for {len(gt_maps)} ground-truth maps")
        for pred, gt in zip(pred_maps, gt_maps):
            s, g, p = matched_iou_sum(pred, gt)
            self.iou_sum += s
            self.gt_instances += g
            self.pred_instances += p

    def compute(self) -> dict[str, torch.Tensor]:
        g = int(self.gt_instances)
        return _scalars({"mean_iou_c": float(self.iou_sum) / g if g else 0.0,
                         "gt_instances": g, "pred_instances": int(self.pred_instances)})


def _gather_any(tensor: torch.Tensor, group: Optional[Any] = None) -> list[torch.Tensor]:
    """All-gather tensors whose size and dtype may differ by rank (a rank may hold none)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, tensor.detach().cpu(), group=group)
    return [t.to(tensor.device) for t in gathered]


def _instances_to_rles(item: dict, what: str) -> tuple[list[dict], Optional[np.ndarray], tuple[int, int]]:
    """(RLEs, scores or None, (H, W)) of a prediction / target dict with "masks" or "instance_map"."""
    if item.get("instance_map") is not None:
        id_map = as_numpy(item["instance_map"])
        ids, rles = id_map_to_rles(id_map)
        scores = None
        if item.get("scores") is not None:
            all_scores = as_numpy(item["scores"], np.float64).reshape(-1)
            if ids.size and ids.max() > all_scores.size:
                raise ValueError(f"{what} id map has instance {ids.max()} but only {all_scores.size} scores")
            scores = all_scores[ids - 1]
        return rles, scores, (int(id_map.shape[0]), int(id_map.shape[1]))
    if item.get("masks") is not None:
        masks = as_numpy(item["masks"])
        rles = masks_to_rles(masks)
        scores = None if item.get("scores") is None else as_numpy(item["scores"], np.float64).reshape(-1)
        if scores is not None and scores.size != len(rles):
            raise ValueError(f"{what}: {len(rles)} masks but {scores.size} scores")
        return rles, scores, (int(masks.shape[1]), int(masks.shape[2]))
    raise ValueError(f"{what} needs an 'instance_map' (H, W) or 'masks' (K, H, W)")


class MaskAP(Metric):
    """COCO mask AP/AP50/AP75/APs/m/l (and AR) over the set, with crowd-sized maxDets (`mask_ap.py`).

    `update(preds, targets)`: per image, `preds[b]` = {"masks": (K, H, W) bool, "scores": (K,)}
    or {"instance_map": (H, W) int, "scores": scores[k - 1] of instance k}; `targets[b]` =
    {"instance_map": (H, W)} or {"masks": (G, H, W)}, optionally with "crowd_masks" (C, H, W) bool:
    `iscrowd` regions, where detections are ignored as COCO does. Missing scores count as 1.0.
    `compute()` -> {"mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl",
    "mask_ar_<maxDets>"..., "mask_ars", "mask_arm", "mask_arl"}; -1 where there is no GT.
    `backend`: "faster" (faster-coco-eval, default) or "pycocotools"; same numbers.
    The per-image records are gathered from every rank (any sizes) before evaluation.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, max_dets: Sequence[int] = DEFAULT_MAX_DETS, backend: str = "faster", prefix: str = "",
                 **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", _gather_any)
        super().__init__(**kwargs)
        self.prefix = prefix  # key prefix: several MaskAPs side by side (the box baselines of BoxInst)
        if backend not in BACKENDS:
            raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected one of {BACKENDS}")
        self.max_dets = tuple(int(m) for m in max_dets)
        self.backend = backend
        self.add_state("records", default=[], dist_reduce_fx="cat")         # utf-8 JSON bytes, all images
        self.add_state("record_sizes", default=[], dist_reduce_fx="cat")    # bytes per image

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        for pred, target in zip(preds, targets):
            dt_rles, scores, size = _instances_to_rles(pred, "prediction")
            gt_rles, _, gt_size = _instances_to_rles(target, "target")
            if size != gt_size:
                raise ValueError(f"prediction size {size} differs from target size {gt_size}")
            crowd = target.get("crowd_masks")
            crowd_rles = masks_to_rles(crowd) if crowd is not None and len(crowd) else []
            record = {"size": list(size), "gt": [r["counts"] for r in gt_rles], "crowd": [r["counts"] for r in crowd_rles],
                      "dt": [r["counts"] for r in dt_rles],
                      "scores": [1.0] * len(dt_rles) if scores is None else [float(s) for s in scores]}
            data = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8)
            self.records.append(torch.from_numpy(data.copy()).to(self.device))
            self.record_sizes.append(torch.tensor([data.size], dtype=torch.long, device=self.device))

    def _decoded_records(self) -> list[dict]:
        if isinstance(self.records, list) and not self.records:
            return []
        data = dim_zero_cat(self.records).to(torch.uint8).cpu().numpy().tobytes()
        sizes = dim_zero_cat(self.record_sizes).long().cpu().tolist()
        out, offset = [], 0
        for n in sizes:
            out.append(json.loads(data[offset:offset + n].decode("utf-8")))
            offset += n
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        records = self._decoded_records()
        if not records:
            keys = [*AP_KEYS, *(f"ar_{m}" for m in sorted(self.max_dets)), "ars", "arm", "arl"]
            return _scalars({f"{self.prefix}mask_{k}": -1.0 for k in keys})
        images, gt_rles, crowd_rles, detections = [], [], [], []
        for image_id, rec in enumerate(records, start=1):
            h, w = rec["size"]
            images.append({"id": image_id, "height": h, "width": w})
            gt_rles.append([{"size": [h, w], "counts": c} for c in rec["gt"]])
            crowd_rles.append([{"size": [h, w], "counts": c} for c in rec.get("crowd", [])])
            detections.extend({"image_id": image_id, "category_id": 1, "score": s,
                               "segmentation": {"size": [h, w], "counts": c}}
                              for c, s in zip(rec["dt"], rec["scores"]))
        results = coco_mask_ap(build_coco_gt(images, gt_rles, crowd_rles), detections, self.max_dets, self.backend)
        return _scalars({f"{self.prefix}mask_{k}": v for k, v in results.items()})
