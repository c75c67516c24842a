"""Point localization metrics under the NWPU-Crowd protocol.

For each image, predictions are matched one-to-one to ground-truth heads, maximising the number
of pairs, where a pair needs distance <= the head's radius (`matching.py`). TP (matched), FP
(unmatched predictions) and FN (unmatched heads) are summed over the dataset; then
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R). Two radii are scored:

- `sigma_s` (strict) and `sigma_l` (the main score). With head boxes of width w and height h:
  sigma_s = min(w, h) / 2 and sigma_l = sqrt(w^2 + h^2) / 2 (`radii_from_boxes`). The NWPU GT
  file gives them per head. Datasets without boxes use fixed radii, by default 4 and 8 px
  ("F1@4 / F1@8" of PET, APGCC, FIDTM).
- Per-level recall: heads carry a size level 0..5 (box area < 10, < 100, < 1e3, < 1e4, < 1e5,
  >= 1e5 px^2). As the official code reports it: recall_k = TP_k / (TP_k + FN_k) summed over
  the dataset (0 for a level with no heads) and their plain mean over the six levels. Which
  heads a maximum matching covers is not unique: `matching="official"` picks the same matching
  as the official code (per-level numbers identical to it); the default Hopcroft-Karp can move
  a few heads between levels (about 20 of 196,238 on the NWPU val files), never TP/FP/FN.
  (The script that wrote the NWPU GT file puts areas of exactly 10, 100, ... into level 0;
  `levels_from_boxes` uses the clean bounds above. Levels read from a file are used as given.)

A rate with a zero denominator is reported as 0.0, as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from crowdseg.metrics._arrays import as_numpy, as_points, safe_ratio
from crowdseg.metrics.matching import candidate_edges, matching_function

THRESHOLD_NAMES = ("sigma_s", "sigma_l")
NUM_LEVELS = 6
LEVEL_AREA_BOUNDS = (10.0, 100.0, 1e3, 1e4, 1e5)
DEFAULT_FIXED_RADII = (4.0, 8.0)


def radii_from_boxes(boxes: Any) -> np.ndarray:
    """(N, 2) float64 (sigma_s, sigma_l) = (min(w, h) / 2, sqrt(w^2 + h^2) / 2) of xyxy boxes (N, 4)."""
    b = as_numpy(boxes, np.float64).reshape(-1, 4)
    w = np.abs(b[:, 2] - b[:, 0])
    h = np.abs(b[:, 3] - b[:, 1])
    return np.stack([np.minimum(w, h) / 2, np.sqrt(w * w + h * h) / 2], axis=1)


def levels_from_boxes(boxes: Any) -> np.ndarray:
    """(N,) int64 size level 0..5 of xyxy boxes (N, 4) by area (bounds `LEVEL_AREA_BOUNDS`)."""
    b = as_numpy(boxes, np.float64).reshape(-1, 4)
    area = np.abs(b[:, 2] - b[:, 0]) * np.abs(b[:, 3] - b[:, 1])
    return np.searchsorted(np.asarray(LEVEL_AREA_BOUNDS), area, side="right").astype(np.int64)


def fixed_radii(num_points: int, radii: Sequence[float] = DEFAULT_FIXED_RADII) -> np.ndarray:
    """(num_points, T) float64: the same radii for every head (datasets without boxes)."""
    return np.tile(np.asarray(radii, dtype=np.float64)[None, :], (num_points, 1))


@dataclass
class LocalizationCounts:
    """TP/FP/FN per threshold, (T,) each, and TP/FN per head level, (T, L) each."""
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tp_level: np.ndarray
    fn_level: np.ndarray

    @classmethod
    def zeros(cls, num_thresholds: int = 2, num_levels: int = NUM_LEVELS) -> "LocalizationCounts":
        z = np.zeros(num_thresholds, dtype=np.int64)
        zl = np.zeros((num_thresholds, num_levels), dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), zl.copy(), zl.copy())

    def __add__(self, other: "LocalizationCounts") -> "LocalizationCounts":
        return LocalizationCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                                  self.tp_level + other.tp_level, self.fn_level + other.fn_level)


def localization_counts(pred: Any, gt: Any, radii: Any, levels: Any = None, num_levels: int = NUM_LEVELS,
                        matching: str = "hopcroft-karp") -> LocalizationCounts:
    """TP/FP/FN of one image for each radius column.

    pred: (P, 2) xy; gt: (G, 2) xy; radii: (G, T) radius of each head per threshold (e.g.
    columns sigma_s, sigma_l); levels: (G,) int head level in [0, num_levels) or -1 for unknown
    (not counted per level), None = all unknown; matching: "hopcroft-karp" or "official" (which
    maximum matching is taken: TP/FP/FN are the same, the per-level split may differ slightly).
    """
    match_fn = matching_function(matching)
    pred, gt = as_points(pred), as_points(gt)
    num_gt, num_pred = gt.shape[0], pred.shape[0]
    radii = _as_radii(radii, num_gt)
    num_thresholds = radii.shape[1]
    levels = (np.full(num_gt, -1, dtype=np.int64) if levels is None
              else as_numpy(levels, np.int64).reshape(-1))
    if levels.shape[0] != num_gt:
        raise ValueError(f"{levels.shape[0]} levels for {num_gt} ground-truth points")
    known = (levels >= 0) & (levels < num_levels)

    counts = LocalizationCounts.zeros(num_thresholds, num_levels)
    # Edges for the largest radius once; each threshold keeps its own subset.
    gt_index, pred_index, distance = candidate_edges(pred, gt, radii.max(axis=1, initial=0.0))
    for t in range(num_thresholds):
        keep = distance <= radii[gt_index, t]
        match = match_fn(gt_index[keep], pred_index[keep], num_gt, num_pred)
        matched = match >= 0
        tp = int(matched.sum())
        counts.tp[t], counts.fp[t], counts.fn[t] = tp, num_pred - tp, num_gt - tp
        counts.tp_level[t] = np.bincount(levels[matched & known], minlength=num_levels)[:num_levels]
        counts.fn_level[t] = np.bincount(levels[~matched & known], minlength=num_levels)[:num_levels]
    return counts


def _as_radii(radii: Any, num_gt: int) -> np.ndarray:
    """(G, T) float64 radii; a 1-D input is one threshold."""
    r = as_numpy(radii, np.float64)
    if r.ndim <= 1:
        r = r.reshape(-1, 1)
    elif r.ndim > 2:
        raise ValueError(f"radii must have shape (G,) or (G, T), got {tuple(r.shape)}")
    if r.shape[0] != num_gt:
        raise ValueError(f"{r.shape[0]} radii for {num_gt} ground-truth points")
    return r


def precision_recall_f1(tp: float, fp: float, fn: float) -> dict[str, float]:
    """{"precision", "recall", "f1"} from summed counts (0.0 where undefined)."""
    precision = safe_ratio(tp, tp + fp)
    recall = safe_ratio(tp, tp + fn)
    return {"precision": precision, "recall": recall,
            "f1": safe_ratio(2 * precision * recall, precision + recall)}


def localization_summary(counts: LocalizationCounts,
                         names: Sequence[str] = THRESHOLD_NAMES) -> dict[str, dict[str, Any]]:
    """Nested report {name: {"precision", "recall", "f1", "tp", "fp", "fn",
    "recall_per_level" (list of L), "recall_level_mean"}} for each threshold."""
    if len(names) != counts.tp.shape[0]:
        raise ValueError(f"{len(names)} names for {counts.tp.shape[0]} thresholds")
    report: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(names):
        tp, fp, fn = int(counts.tp[t]), int(counts.fp[t]), int(counts.fn[t])
        per_level = [safe_ratio(a, a + b) for a, b in zip(counts.tp_level[t], counts.fn_level[t])]
        report[name] = {**precision_recall_f1(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn,
                        "recall_per_level": per_level,
                        "recall_level_mean": float(np.mean(per_level)) if per_level else 0.0}
    return report


def flatten_summary(report: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"sigma_l_f1": ..., "sigma_l_recall_level0": ..., ...}: one scalar per key, for loggers."""
    flat: dict[str, float] = {}
    for name, values in report.items():
        for key, value in values.items():
            if key == "recall_per_level":
                for level, v in enumerate(value):
                    flat[f"{name}_recall_level{level}"] = v
            else:
                flat[f"{name}_{key}"] = value
    return flat


def resolve_radii_and_levels(num_gt: int, radii: Any = None, boxes: Any = None,
                             fixed: Optional[Sequence[float]] = DEFAULT_FIXED_RADII
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The (G, T) radii and (G,) levels of one image: given radii, else from boxes, else fixed.

    Levels come from the boxes when there are any, else are -1 (unknown).
    """
    box_arr = None if boxes is None else as_numpy(boxes, np.float64).reshape(-1, 4)
    if box_arr is not None and box_arr.shape[0] != num_gt:
        raise ValueError(f"{box_arr.shape[0]} boxes for {num_gt} ground-truth points")
    if radii is not None:
        r = _as_radii(radii, num_gt)
    elif box_arr is not None:
        r = radii_from_boxes(box_arr)
    elif fixed is not None:
        r = fixed_radii(num_gt, fixed)
    else:
        raise ValueError("no radii: give radii or boxes, or set fixed radii")
    levels = levels_from_boxes(box_arr) if box_arr is not None else np.full(num_gt, -1, dtype=np.int64)
    return r, levels
