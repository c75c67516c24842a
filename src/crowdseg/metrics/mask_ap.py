"""COCO mask AP (AP, AP50, AP75, APs/m/l) for crowds, through faster-coco-eval or pycocotools.

- Backends: "faster" (default; faster-coco-eval, the COCO protocol with its per-image matching
  and accumulation in C++) and "pycocotools" (the reference). They give the same numbers (tested);
  on crowds pycocotools' Python per-image loop is the bottleneck: 10 images x 1,500 people took
  450 s with pycocotools and 11 s with faster-coco-eval, same AP (`benchmarks/metrics.py`).

- Crowd images hold hundreds to thousands of people, more than COCO's 100 detections per image,
  so `maxDets` is raised: by default (100, 1000, 5000). AP, AP50, AP75 and APs/m/l are taken at
  the largest value (5000); AR is reported at each value (`ar_100`, `ar_1000`, `ar_5000`).
  pycocotools' `summarize()` hard-codes its first AP at maxDets=100 and indexes the list by
  position, so it is not used: `summarize_coco_eval` reads the accumulated precision/recall
  arrays at the right maxDets index itself.
- Values are fractions in [0, 1]; -1 where the set has no ground truth in that area range
  (pycocotools' convention).
- GT from id maps gets the mask area as `area`, as COCO does. A COCO GT JSON (e.g. CIS) is used
  exactly as it is: its `area` (the box area, for CIS) decides small/medium/large. Only
  annotation ids are shifted when one of them is 0, because pycocotools treats id 0 as
  "unmatched" (so does faster-coco-eval); ids are internal references, nothing else changes.
- Predictions are compressed RLEs with scores. `id_map_to_rles` encodes an (H, W) id map
  straight from its runs in column-major order, without one full-size binary mask per instance.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crowdseg.errors import DataError
from crowdseg.metrics._arrays import as_numpy

DEFAULT_MAX_DETS = (100, 1000, 5000)
BACKENDS = ("faster", "pycocotools")
PERSON_CATEGORY = {"id": 1, "name": "person", "supercategory": "person"}
AP_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def _rle_to_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def id_map_to_rles(id_map: Any) -> tuple[np.ndarray, list[dict]]:
    """Compressed COCO RLE of every instance of an id map.

    id_map: (H, W) integer array, 0 background. Returns (ids (K,) int64 sorted, rles: K dicts
    {"size": [H, W], "counts": str}) in the order of `ids`.
    """
    m = as_numpy(id_map)
    if m.ndim != 2:
        raise ValueError(f"id map must have shape (H, W), got {tuple(m.shape)}")
    h, w = m.shape
    flat = m.astype(np.int64, copy=False).ravel(order="F")  # COCO RLE runs go down columns
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [flat.size]])
    values = flat[starts]
    fg = values != 0
    starts, ends, values = starts[fg], ends[fg], values[fg]
    order = np.argsort(values, kind="stable")  # group runs by id, keeping their order along the image
    starts, ends, values = starts[order], ends[order], values[order]
    ids, first = np.unique(values, return_index=True)
    rles = []
    for k, (lo, hi) in enumerate(zip(first, list(first[1:]) + [values.size])):
        s, e = starts[lo:hi], ends[lo:hi]
        prev_end = np.concatenate([[0], e[:-1]])
        counts = np.empty(2 * s.size + 1, dtype=np.int64)
        counts[0:-1:2] = s - prev_end   # background run before each foreground run
        counts[1::2] = e - s            # the foreground run
        counts[-1] = flat.size - e[-1]
        if counts[-1] == 0:
            counts = counts[:-1]  # as pycocotools' encoder: no trailing empty run
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
        rles.append(_rle_to_json(rle))
    return ids.astype(np.int64), rles


def masks_to_rles(masks: Any) -> list[dict]:
    """Compressed COCO RLEs of binary masks (K, H, W)."""
    m = as_numpy(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must have shape (K, H, W), got {tuple(m.shape)}")
    if m.shape[0] == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    return [_rle_to_json(r) for r in encoded]


def build_coco_gt(images: Sequence[dict], gt_rles: Sequence[Sequence[dict]],
                  crowd_rles: Optional[Sequence[Sequence[dict]]] = None) -> COCO:
    """An in-memory COCO ground truth: images [{"id", "height", "width"}], per-image RLE lists.

    Each GT gets its mask area as `area`, its mask box as `bbox`, iscrowd 0, category person.
    `crowd_rles` (per image, optional) are `iscrowd` regions: detections inside them are ignored.
    """
    annotations = []
    crowd_rles = crowd_rles if crowd_rles is not None else [[] for _ in images]
    for image, rles, crowds in zip(images, gt_rles, crowd_rles):
        for rle, iscrowd in [*((r, 0) for r in rles), *((r, 1) for r in crowds)]:
            coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": 1,
                                "segmentation": rle, "area": float(mask_utils.area(coded)),
                                "bbox": [float(v) for v in mask_utils.toBbox(coded)], "iscrowd": iscrowd})
    return _coco_from_dict({"images": [dict(i) for i in images], "annotations": annotations,
                            "categories": [dict(PERSON_CATEGORY)]})


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected one of {BACKENDS}")


def _coco_from_dict(dataset: dict, backend: str = "pycocotools") -> Any:
    _check_backend(backend)
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO
        coco = FasterCOCO()
        coco.print_function = _silent
    else:
        coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_gt(path: str | os.PathLike) -> COCO:
    """A COCO GT JSON (e.g. CIS.json) as it is; only an annotation id 0 shifts ids by one."""
    path = Path(path)
    try:
        dataset = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: COCO ground-truth file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable COCO JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise DataError(f"{path}: COCO ground truth has no {key!r} key")
    for k, ann in enumerate(dataset["annotations"]):
        missing = [f for f in ("id", "image_id", "category_id", "segmentation", "area", "iscrowd") if f not in ann]
        if missing:
            raise DataError(f"{path}: annotations[{k}] lacks {', '.join(missing)}")
    if any(ann["id"] == 0 for ann in dataset["annotations"]):
        dataset["annotations"] = [{**ann, "id": ann["id"] + 1} for ann in dataset["annotations"]]
    return _coco_from_dict(dataset)


def load_detections(coco_gt: COCO, detections: Sequence[dict]) -> COCO:
    """Detections [{"image_id", "category_id", "segmentation" (RLE), "score"}] as a COCO result set.

    An empty list gives an empty result set (pycocotools' loadRes refuses one).
    """
    gt_images = set(coco_gt.getImgIds())
    for k, det in enumerate(detections):
        missing = [f for f in ("image_id", "category_id", "segmentation", "score") if f not in det]
        if missing:
            raise DataError(f"detection {k} lacks {', '.join(missing)}")
        if det["image_id"] not in gt_images:
            raise DataError(f"detection {k} is for image {det['image_id']}, which the ground truth lacks")
    if not detections:
        backend = "pycocotools" if isinstance(coco_gt, COCO) else "faster"
        return _coco_from_dict({"images": copy.deepcopy(coco_gt.dataset["images"]), "annotations": [],
                                "categories": copy.deepcopy(coco_gt.dataset["categories"])}, backend)
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes([dict(d) for d in detections])


def summarize_coco_eval(coco_eval: COCOeval) -> dict[str, float]:
    """AP/AP50/AP75/APs/m/l at the largest maxDets, AR at every maxDets (and ARs/m/l at the largest).

    Reads `coco_eval.eval` after `accumulate()`: precision [T, R, K, A, M], recall [T, K, A, M].
    """
    p = coco_eval.params
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    last = len(p.maxDets) - 1

    def mean_valid(x: np.ndarray) -> float:
        valid = x[x > -1]
        return float(valid.mean()) if valid.size else -1.0

    def iou_index(thr: float) -> int:
        return int(np.flatnonzero(np.isclose(p.iouThrs, thr))[0])

    out = {
        "ap": mean_valid(precision[:, :, :, area["all"], last]),
        "ap50": mean_valid(precision[iou_index(0.5), :, :, area["all"], last]),
        "ap75": mean_valid(precision[iou_index(0.75), :, :, area["all"], last]),
        "aps": mean_valid(precision[:, :, :, area["small"], last]),
        "apm": mean_valid(precision[:, :, :, area["medium"], last]),
        "apl": mean_valid(precision[:, :, :, area["large"], last]),
    }
    for m, max_det in enumerate(p.maxDets):
        out[f"ar_{max_det}"] = mean_valid(recall[:, :, area["all"], m])
    for label, key in (("small", "ars"), ("medium", "arm"), ("large", "arl")):
        out[key] = mean_valid(recall[:, :, area[label], last])
    return out


def coco_mask_ap(coco_gt: COCO, detections: Sequence[dict], max_dets: Sequence[int] = DEFAULT_MAX_DETS,
                 backend: str = "faster") -> dict[str, float]:
    """COCO segm evaluation of `detections` against `coco_gt` (a pycocotools COCO) with raised maxDets.

    backend: "faster" (faster-coco-eval) or "pycocotools". Returns {"ap", "ap50", "ap75", "aps",
    "apm", "apl", "ar_<maxDets>"..., "ars", "arm", "arl"}.
    """
    _check_backend(backend)
    if backend == "faster":
        from faster_coco_eval import COCOeval_faster

        gt = _coco_from_dict(copy.deepcopy(coco_gt.dataset), "faster")
        coco_eval = COCOeval_faster(gt, load_detections(gt, detections), iouType="segm", print_function=_silent)
    else:
        coco_eval = COCOeval(coco_gt, load_detections(coco_gt, detections), iouType="segm")
    coco_eval.params.maxDets = sorted(int(m) for m in max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return summarize_coco_eval(coco_eval)


def evaluate_coco_json(gt_path: str | os.PathLike, detections: str | os.PathLike | Sequence[dict],
                       max_dets: Sequence[int] = DEFAULT_MAX_DETS, backend: str = "faster") -> dict[str, float]:
    """Mask AP of detections (a list, or a COCO results JSON file) against a COCO GT JSON file.

    The GT file is used as it defines itself (for CIS, `area` is the box area and decides the
    small/medium/large buckets).
    """
    coco_gt = load_coco_gt(gt_path)
    if isinstance(detections, (str, os.PathLike)):
        try:
            detections = json.loads(Path(detections).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{detections}: not a readable COCO results JSON ({exc})") from None
        if not isinstance(detections, list):
            raise DataError(f"{detections}: a COCO results file holds a list of detections")
    return coco_mask_ap(coco_gt, detections, max_dets, backend)


def detections_from_id_map(image_id: int, id_map: Any, scores: Optional[Any] = None) -> list[dict]:
    """COCO detections of an (H, W) id map: instance k scores `scores[k - 1]` (1.0 without scores)."""
    ids, rles = id_map_to_rles(id_map)
    score_arr = None if scores is None else as_numpy(scores, np.float64).reshape(-1)
    if score_arr is not None and ids.size and ids.max() > score_arr.size:
        raise ValueError(f"id map has instance {ids.max()} but only {score_arr.size} scores")
    return [{"image_id": image_id, "category_id": 1, "segmentation": rle,
             "score": 1.0 if score_arr is None else float(score_arr[k - 1])}
            for k, rle in zip(ids, rles)]


def detections_from_masks(image_id: int, masks: Any, scores: Optional[Any] = None) -> list[dict]:
    """COCO detections of binary masks (K, H, W) with scores (K,) (1.0 without scores)."""
    rles = masks_to_rles(masks)
    score_arr = np.ones(len(rles)) if scores is None else as_numpy(scores, np.float64).reshape(-1)
    if score_arr.size != len(rles):
        raise ValueError(f"{len(rles)} masks but {score_arr.size} scores")
    return [{"image_id": image_id, "category_id": 1, "segmentation": rle, "score": float(s)}
            for rle, s in zip(rles, score_arr)]
