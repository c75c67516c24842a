"""Mean IoU_C: Hungarian-matched instance IoU between predicted and ground-truth id maps.

Mean IoU_C = (sum over images of the matched IoUs) / (number of ground-truth instances in the
set) (XMask, METHODS.md G). Per image, predicted and GT instances are matched one-to-one to
maximise the total IoU (`linear_sum_assignment` on 1 - IoU, as XMask does).

An id map is an (H, W) integer array: 0 background, k > 0 an instance. Crowds hold thousands of
instances, so no dense G x P IoU matrix is built: the joint histogram of (gt id, pred id) is
taken over the pixels where both are foreground (only pairs with IoU > 0 can add to the sum),
the overlap graph is split into connected components, and each component is matched on its own
small dense block. This gives the same optimum as one assignment on the full matrix, because
pairs with IoU 0 add nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from crowdseg.metrics._arrays import as_numpy, safe_ratio


def _id_map(x: Any, what: str) -> np.ndarray:
    arr = as_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} id map must have shape (H, W), got {tuple(arr.shape)}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{what} id map must hold integer ids")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} id map has negative ids")
    return arr


def instance_overlaps(pred_map: Any, gt_map: Any) -> dict[str, np.ndarray]:
    """Sparse IoU of every (GT instance, predicted instance) pair that overlaps.

    pred_map, gt_map: (H, W) integer id maps (0 background). Returns {"gt_ids" (G,),
    "pred_ids" (P,): the instance ids present; "gt_index" (E,), "pred_index" (E,): the pairs
    with IoU > 0 as indices into those id lists; "iou" (E,)}.
    """
    pred, gt = _id_map(pred_map, "predicted"), _id_map(gt_map, "ground-truth")
    if pred.shape != gt.shape:
        raise ValueError(f"predicted id map {pred.shape} and ground-truth id map {gt.shape} differ in size")
    pred, gt = pred.ravel(), gt.ravel()
    gt_area_by_id = np.bincount(gt) if gt.size else np.zeros(1, dtype=np.int64)
    pred_area_by_id = np.bincount(pred) if pred.size else np.zeros(1, dtype=np.int64)
    gt_ids = np.flatnonzero(gt_area_by_id[1:]) + 1
    pred_ids = np.flatnonzero(pred_area_by_id[1:]) + 1
    both = (gt > 0) & (pred > 0)
    num_pred_slots = np.int64(pred_area_by_id.shape[0])
    joint, inter = np.unique(gt[both] * num_pred_slots + pred[both], return_counts=True)
    pair_gt, pair_pred = joint // num_pred_slots, joint % num_pred_slots
    union = gt_area_by_id[pair_gt] + pred_area_by_id[pair_pred] - inter
    return {
        "gt_ids": gt_ids,
        "pred_ids": pred_ids,
        "gt_index": np.searchsorted(gt_ids, pair_gt),
        "pred_index": np.searchsorted(pred_ids, pair_pred),
        "iou": inter / union,
    }


def matched_iou_sum(pred_map: Any, gt_map: Any) -> tuple[float, int, int]:
    """(sum of Hungarian-matched IoUs, number of GT instances, number of predicted instances).

    pred_map, gt_map: (H, W) integer id maps of one image (0 background).
    """
    ov = instance_overlaps(pred_map, gt_map)
    num_gt, num_pred = ov["gt_ids"].shape[0], ov["pred_ids"].shape[0]
    gi, pi, iou = ov["gt_index"], ov["pred_index"], ov["iou"]
    if iou.size == 0:
        return 0.0, num_gt, num_pred
    # Components of the overlap graph; nodes 0..G-1 are GT, G..G+P-1 predictions.
    n = num_gt + num_pred
    graph = sp.coo_matrix((np.ones(iou.size, dtype=np.int8), (gi, pi + num_gt)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    comp = labels[gi]
    edges_per_comp = np.bincount(comp, minlength=labels.max() + 1)
    single = edges_per_comp[comp] == 1  # one edge: one GT and one prediction, nothing to decide
    total = float(iou[single].sum())
    rest = np.flatnonzero(~single)
    if rest.size:
        order = rest[np.argsort(comp[rest], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        for group in np.split(order, bounds):
            rows, r_inv = np.unique(gi[group], return_inverse=True)
            cols, c_inv = np.unique(pi[group], return_inverse=True)
            block = np.zeros((rows.size, cols.size))
            block[r_inv, c_inv] = iou[group]
            r, c = linear_sum_assignment(block, maximize=True)
            total += float(block[r, c].sum())
    return total, num_gt, num_pred


def mean_iou_c(pred_maps: Any, gt_maps: Any) -> float:
    """Mean IoU_C over a set: sum of matched IoUs / number of GT instances (0.0 without GT).

    pred_maps, gt_maps: sequences of (H_b, W_b) id maps, image by image.
    """
    if len(pred_maps) != len(gt_maps):
        raise ValueError(f"{len(pred_maps)} predicted maps for {len(gt_maps)} ground-truth maps")
    total, num_gt = 0.0, 0
    for pred, gt in zip(pred_maps, gt_maps):
        s, g, _ = matched_iou_sum(pred, gt)
        total, num_gt = total + s, num_gt + g
    return safe_ratio(total, num_gt)
