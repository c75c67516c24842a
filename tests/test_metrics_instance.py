"""Mean IoU_C and COCO mask AP on constructed id maps with known answers, and on CIS.json."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from crowdseg.errors import DataError
from crowdseg.metrics.instance_iou import instance_overlaps, matched_iou_sum, mean_iou_c
from crowdseg.metrics.mask_ap import (build_coco_gt, coco_mask_ap, detections_from_id_map, evaluate_coco_json,
                                      id_map_to_rles, load_coco_gt, masks_to_rles)
from crowdseg.metrics.torch_metrics import InstanceIoU, MaskAP

CIS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cis_crowdhuman_instance_masks" / "CIS.json"


def blocks_map(height, width, rows, cols):
    """An id map tiled with rows x cols rectangles, ids 1..rows*cols in row-major order."""
    r = np.arange(height) * rows // height
    c = np.arange(width) * cols // width
    return (r[:, None] * cols + c[None, :] + 1).astype(np.int64)


def random_map(rng, size=24, n=8):
    """Random overlapping rectangles painted in order; later ones cover earlier ones."""
    m = np.zeros((size, size), dtype=np.int64)
    for k in range(1, n + 1):
        y, x = rng.integers(0, size - 2, size=2)
        h, w = rng.integers(2, 10, size=2)
        m[y:y + h, x:x + w] = k
    return m


def dense_matched_iou(pred, gt):
    """Reference: full IoU matrix from per-instance masks, Hungarian on 1 - IoU (as XMask)."""
    gt_ids = [i for i in np.unique(gt) if i]
    pred_ids = [i for i in np.unique(pred) if i]
    if not gt_ids or not pred_ids:
        return 0.0
    iou = np.zeros((len(gt_ids), len(pred_ids)))
    for a, g in enumerate(gt_ids):
        for b, p in enumerate(pred_ids):
            inter = np.logical_and(gt == g, pred == p).sum()
            iou[a, b] = inter / np.logical_or(gt == g, pred == p).sum()
    r, c = linear_sum_assignment(1 - iou)
    return float(iou[r, c].sum())


# ---------------------------------------------------------------- Mean IoU_C

def test_perfect_prediction_with_other_ids_gives_one():
    gt = blocks_map(20, 30, 2, 3)
    pred = np.where(gt > 0, 100 - gt, 0)  # same instances, different ids
    assert matched_iou_sum(pred, gt) == (pytest.approx(6.0), 6, 6)
    assert mean_iou_c([pred, torch.from_numpy(gt)], [gt, gt]) == pytest.approx(1.0)


def test_hand_computed_iou_c():
    gt = np.zeros((6, 6), dtype=np.int64)
    gt[0:2, 0:2] = 1          # 4 px
    gt[4:6, 4:6] = 2          # 4 px, never predicted
    pred = np.zeros_like(gt)
    pred[0:2, 0:3] = 7        # covers GT 1 plus 2 px: IoU 4/6
    pred[3, 0] = 9            # a stray prediction touching nothing
    total, num_gt, num_pred = matched_iou_sum(pred, gt)
    assert total == pytest.approx(4 / 6) and num_gt == 2 and num_pred == 2
    assert mean_iou_c([pred], [gt]) == pytest.approx((4 / 6) / 2)


def test_hungarian_beats_greedy():
    # GT 1 = {5}, GT 2 = {1, 3, 4, 9}; prediction 1 = {3, 4, 5}, prediction 2 = {1, 6, 8, 9} (pixels of one row)
    gt = np.array([[0, 2, 0, 2, 2, 1, 0, 0, 0, 2]])
    pred = np.array([[0, 2, 0, 1, 1, 1, 2, 0, 2, 2]])
    ov = instance_overlaps(pred, gt)
    iou = {(int(ov["gt_ids"][g]), int(ov["pred_ids"][p])): v
           for g, p, v in zip(ov["gt_index"], ov["pred_index"], ov["iou"])}
    assert iou == pytest.approx({(1, 1): 1 / 3, (2, 1): 2 / 5, (2, 2): 2 / 6})
    # greedy would take (2, 1) = 0.4 and stop; the assignment takes (1, 1) + (2, 2) = 2/3
    assert matched_iou_sum(pred, gt)[0] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(30))
def test_sparse_iou_matching_equals_dense_hungarian(seed):
    rng = np.random.default_rng(seed)
    gt, pred = random_map(rng), random_map(rng)
    total, num_gt, _ = matched_iou_sum(pred, gt)
    assert total == pytest.approx(dense_matched_iou(pred, gt))
    assert num_gt == len(np.unique(gt[gt > 0]))


def test_iou_c_edge_cases():
    gt = blocks_map(4, 4, 2, 2)
    assert matched_iou_sum(np.zeros_like(gt), gt) == (0.0, 4, 0)
    assert mean_iou_c([np.zeros((3, 3), int)], [np.zeros((3, 3), int)]) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        matched_iou_sum(np.zeros((3, 3), int), gt)
    with pytest.raises(ValueError, match="negative"):
        matched_iou_sum(-gt, gt)


def test_instance_iou_metric_accumulates_over_the_set():
    rng = np.random.default_rng(5)
    pairs = [(random_map(rng), random_map(rng)) for _ in range(5)]
    metric = InstanceIoU()
    metric.update([torch.from_numpy(p) for p, _ in pairs[:2]], [torch.from_numpy(g) for _, g in pairs[:2]])
    metric.update([p for p, _ in pairs[2:]], [g for _, g in pairs[2:]])
    out = metric.compute()
    assert float(out["mean_iou_c"]) == pytest.approx(mean_iou_c([p for p, _ in pairs], [g for _, g in pairs]))
    assert int(out["gt_instances"]) == sum(len(np.unique(g[g > 0])) for _, g in pairs)


# ---------------------------------------------------------------- RLE helpers

@pytest.mark.parametrize("seed", range(5))
def test_id_map_rles_equal_pycocotools_encoding(seed):
    rng = np.random.default_rng(seed)
    m = random_map(rng, size=17, n=10)
    m[-1, -1] = 3  # a run that ends at the last pixel
    ids, rles = id_map_to_rles(m)
    assert ids.tolist() == sorted(set(m[m > 0].tolist()))
    for i, rle in zip(ids, rles):
        ref = mask_utils.encode(np.asfortranarray((m == i).astype(np.uint8)))
        assert rle == {"size": [17, 17], "counts": ref["counts"].decode("ascii")}
    masks = np.stack([m == i for i in ids])
    assert masks_to_rles(masks) == rles


# ---------------------------------------------------------------- mask AP

def dets_and_gt(id_maps, pred_maps, scores=None):
    images = [{"id": k + 1, "height": m.shape[0], "width": m.shape[1]} for k, m in enumerate(id_maps)]
    gt = build_coco_gt(images, [id_map_to_rles(m)[1] for m in id_maps])
    dets = []
    for k, p in enumerate(pred_maps):
        dets += detections_from_id_map(k + 1, p, None if scores is None else scores[k])
    return gt, dets


BACKENDS = pytest.mark.parametrize("backend", ["faster", "pycocotools"])


@BACKENDS
def test_perfect_prediction_gives_ap_one(backend):
    gt_map = blocks_map(60, 80, 3, 4)
    gt, dets = dets_and_gt([gt_map], [gt_map], [np.linspace(0.1, 0.9, 12)])
    out = coco_mask_ap(gt, dets, backend=backend)
    assert out["ap"] == out["ap50"] == out["ap75"] == 1.0
    assert out["ar_100"] == 1.0


@BACKENDS
def test_hand_computed_ap_with_a_false_positive_ranked_first(backend):
    gt_map = np.zeros((40, 40), dtype=np.int64)
    gt_map[0:10, 0:10] = 1
    gt_map[20:30, 20:30] = 2
    pred = np.zeros_like(gt_map)
    pred[0:10, 0:10] = 1          # perfect on GT 1, score 0.9
    pred[0:10, 30:40] = 2         # touches nothing, score 0.95 (ranked first)
    gt, dets = dets_and_gt([gt_map], [pred], [np.array([0.9, 0.95])])
    out = coco_mask_ap(gt, dets, backend=backend)
    # PR curve: (R 0, P 0), (R 0.5, P 0.5); interpolated precision 0.5 at the 51 recall points 0..0.5
    assert out["ap"] == pytest.approx(51 * 0.5 / 101)
    assert out["ap50"] == out["ap75"] == pytest.approx(out["ap"])
    assert out["ar_100"] == pytest.approx(0.5)


@BACKENDS
def test_raised_max_dets_count_every_person_of_a_crowd(backend):
    gt_map = blocks_map(60, 100, 10, 15)  # 150 people
    scores = np.random.default_rng(0).uniform(0.05, 1, size=150)
    gt, dets = dets_and_gt([gt_map], [gt_map], [scores])
    out = coco_mask_ap(gt, dets, backend=backend)
    assert out["ap"] == 1.0 and out["ar_1000"] == 1.0
    assert out["ar_100"] == pytest.approx(100 / 150)  # COCO's default 100 detections would miss a third
    assert coco_mask_ap(gt, dets, max_dets=(10, 50, 100), backend=backend)["ap"] < 0.7


@pytest.mark.parametrize("seed", range(6))
def test_backends_agree_on_random_crowds(seed):
    rng = np.random.default_rng(seed)
    gt_maps = [random_map(rng, size=40, n=25) for _ in range(3)]
    pred_maps = [np.roll(m, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2))) for m in gt_maps]
    pred_maps[0][rng.random((40, 40)) < 0.1] = 0  # ragged masks
    gt, dets = dets_and_gt(gt_maps, pred_maps, [rng.uniform(size=30) for _ in range(3)])
    faster, reference = coco_mask_ap(gt, dets, backend="faster"), coco_mask_ap(gt, dets, backend="pycocotools")
    assert faster.keys() == reference.keys()
    assert faster == pytest.approx(reference, abs=1e-12)
    assert 0 < reference["ap"] < 1


@BACKENDS
def test_no_detections_and_no_ground_truth(backend):
    gt_map = blocks_map(10, 10, 1, 2)
    gt, _ = dets_and_gt([gt_map], [gt_map])
    assert coco_mask_ap(gt, [], backend=backend)["ap"] == 0.0
    gt_empty, dets = dets_and_gt([np.zeros((10, 10), int)], [gt_map])
    assert coco_mask_ap(gt_empty, dets, backend=backend)["ap"] == -1.0  # COCO convention: no GT, undefined
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        coco_mask_ap(gt, [], backend="detectron")


def test_mask_ap_metric_accepts_id_maps_and_mask_stacks():
    gt_map = blocks_map(30, 40, 2, 2)
    noisy = gt_map.copy()
    noisy[:, 18:22] = 0           # trims the instances a little
    scores = torch.tensor([0.3, 0.6, 0.9, 0.2])
    a = MaskAP()
    a.update([{"instance_map": torch.from_numpy(noisy), "scores": scores}], [{"instance_map": torch.from_numpy(gt_map)}])
    b = MaskAP()
    masks = torch.stack([torch.from_numpy(noisy == k) for k in range(1, 5)])
    b.update([{"masks": masks, "scores": scores}], [{"masks": torch.stack([torch.from_numpy(gt_map == k) for k in range(1, 5)])}])
    out_a, out_b = a.compute(), b.compute()
    assert out_a.keys() == out_b.keys() >= {"mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl"}
    assert all(float(out_a[k]) == float(out_b[k]) for k in out_a)
    gt, dets = dets_and_gt([gt_map], [noisy], [scores.numpy()])
    assert float(out_a["mask_ap"]) == pytest.approx(coco_mask_ap(gt, dets)["ap"])
    assert 0 < float(out_a["mask_ap"]) < 1 and float(out_a["mask_ap50"]) == 1.0


def test_mask_ap_metric_without_images_reports_undefined():
    empty = MaskAP()
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = empty.compute()
    filled = MaskAP()
    filled.update([{"instance_map": blocks_map(8, 8, 1, 2)}], [{"instance_map": blocks_map(8, 8, 1, 2)}])
    assert out.keys() == filled.compute().keys()
    assert all(float(v) == -1.0 for v in out.values())
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        MaskAP(backend="fast")


def test_cis_json_is_evaluated_with_its_box_areas():
    coco = load_coco_gt(CIS)
    anns = coco.dataset["annotations"]
    assert len(anns) == 3453 and len(coco.dataset["images"]) == 459
    # CIS `area` is the box area; only its 169 "small" instances (box area < 32^2) get a detection
    small = [a for a in anns if a["area"] < 32 ** 2]
    assert len(small) == 169
    dets = []
    for a in small:
        rle = coco.annToRLE(a)
        dets.append({"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    out = evaluate_coco_json(CIS, dets)
    # with mask areas, more instances would count as small and APs would drop below 1
    assert out["aps"] == 1.0 and out["ars"] == 1.0
    assert out["apl"] == 0.0


def test_cis_ground_truth_as_detections_gives_ap_one(tmp_path):
    coco = load_coco_gt(CIS)
    dets = []
    for a in coco.dataset["annotations"]:
        rle = coco.annToRLE(a)
        dets.append({"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    # CIS has an annotation with id 0, which both backends would count as unmatched: ids are shifted
    for backend in ("faster", "pycocotools"):
        out = evaluate_coco_json(CIS, path, backend=backend)
        assert out["ap"] == 1.0 and out["apl"] == 1.0, backend


def test_bad_coco_inputs_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_coco_gt(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": [{"id": 1}], "categories": []}))
    with pytest.raises(DataError, match=r"annotations\[0\] lacks image_id"):
        load_coco_gt(bad)
    gt, dets = dets_and_gt([blocks_map(4, 4, 1, 1)], [blocks_map(4, 4, 1, 1)])
    with pytest.raises(DataError, match="image 99"):
        coco_mask_ap(gt, [{**dets[0], "image_id": 99}])
