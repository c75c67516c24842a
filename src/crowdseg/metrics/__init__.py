"""Evaluation metrics: counting, NWPU-protocol localization, Mean IoU_C and COCO mask AP.

Pure functions (numpy / scipy / pycocotools, no torch import):
- `counting`: `counting_errors`, `counting_sums`, `counting_from_sums`
- `matching`: `match_points`, `candidate_edges`, `maximum_matching`
- `localization`: `localization_counts`, `localization_summary`, `radii_from_boxes`, ...
- `nwpu`: `read_gt_file`, `read_pred_file`, `write_pred_file`
- `instance_iou`: `matched_iou_sum`, `mean_iou_c`
- `mask_ap`: `id_map_to_rles`, `coco_mask_ap`, `evaluate_coco_json`, ...
- `eval_loc`: `main(argv)` of `crowdseg eval-loc`
- `report`: `write_metrics_json`

torchmetrics classes for validate / test (`torch_metrics`): `CountingMetrics`,
`LocalizationMetrics`, `InstanceIoU`, `MaskAP`. They are exported here lazily, so the file-based
tools (`crowdseg eval-loc`) start without importing torch.
"""
from __future__ import annotations

from typing import Any

from crowdseg.metrics.report import write_metrics_json

_TORCH_METRICS = ("CountingMetrics", "LocalizationMetrics", "InstanceIoU", "MaskAP")

__all__ = ["write_metrics_json", *_TORCH_METRICS]


def __getattr__(name: str) -> Any:
    if name in _TORCH_METRICS:
        from crowdseg.metrics import torch_metrics
        return getattr(torch_metrics, name)
    raise AttributeError(f"module 'crowdseg.metrics' has no attribute {name!r}")
