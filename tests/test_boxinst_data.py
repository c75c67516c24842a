"""BoxInst data: whole-person synthetic boxes, short-side resizing, a constructed CrowdHuman `.odgt`,
and the CIS protocol (its own masks as predictions give AP 100)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from datamodules.readers.crowdhuman import read_crowdhuman
from datamodules.short_side import ShortSideEvalTransform, ShortSideTrainTransform, short_side_scale
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec, render_crowd


def test_synthetic_full_boxes_contain_the_visible_person_and_change_nothing_else():
    spec = SyntheticSpec(height=96, width=96, min_people=20, max_people=30, seed=1)
    plain = render_crowd(spec, "train", 0)
    full = render_crowd(SyntheticSpec(**{**spec.__dict__, "full_boxes": True}), "train", 0)
    assert "full_boxes" not in plain
    for key, value in plain.items():
        assert np.array_equal(value, full[key]), key
    boxes, visible = full["full_boxes"], full["boxes"]
    assert boxes.shape == visible.shape
    # the visible pixels of a person lie in its whole-person box (up to the pixel rounding of the ellipse)
    assert (boxes[:, :2] <= visible[:, :2] + 1).all() and (boxes[:, 2:] >= visible[:, 2:] - 1).all()
    # occlusion: some whole-person boxes are much larger than what is visible
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    assert (area(visible) < 0.7 * area(boxes)).any()
    sample = SyntheticCrowd(1, "train", SyntheticSpec(**{**spec.__dict__, "full_boxes": True}))[0]
    assert torch.equal(sample["full_boxes"], torch.from_numpy(boxes))
    assert "full_boxes" not in SyntheticCrowd(1, "train", spec)[0]


def test_synthetic_person_scale_draws_larger_people():
    small = render_crowd(SyntheticSpec(height=128, width=128, min_people=10, max_people=10, full_boxes=True), "train", 0)
    large = render_crowd(SyntheticSpec(height=128, width=128, min_people=10, max_people=10, full_boxes=True,
                                       person_scale=2.0), "train", 0)
    height = lambda b: np.median(b[:, 3] - b[:, 1])
    assert height(large["full_boxes"]) > 1.5 * height(small["full_boxes"])


def test_short_side_scale():
    assert short_side_scale(600, 800, 480, 1333) == pytest.approx(0.8)
    assert short_side_scale(400, 2000, 480, 1333) == pytest.approx(1333 / 2000)  # long side capped
    assert short_side_scale(100, 100, 480, None) == pytest.approx(4.8)


def test_short_side_transforms_move_boxes_and_keep_the_original_masks():
    sample = SyntheticCrowd(1, "train", SyntheticSpec(height=60, width=80, min_people=5, max_people=8,
                                                      full_boxes=True))[0]
    train = ShortSideTrainTransform((90, 90), max_size=1333, hflip=0.0, seed=0)(sample)
    assert tuple(train["image"].shape[-2:]) == (90, 120)
    kept = len(train["full_boxes"])
    assert kept == len(train["points"])
    assert torch.allclose(train["full_boxes"], ((sample["full_boxes"][:kept] + 0.5) * 1.5 - 0.5).clamp(
        torch.tensor(0.0), torch.tensor([119.0, 89.0, 119.0, 89.0])), atol=1e-4)
    ev = ShortSideEvalTransform(90, 1333)(sample)
    assert tuple(ev["image"].shape[-2:]) == (96, 128)           # padded to a multiple of 32
    assert ev["meta"]["valid_size"] == (90, 120) and ev["meta"]["scale"] == pytest.approx(1.5)
    assert torch.equal(ev["orig_instance_map"], sample["instance_map"])
    same = ShortSideEvalTransform(None)(sample)
    assert "orig_instance_map" not in same and tuple(same["image"].shape[-2:]) == (64, 96)


def test_crowdhuman_reader_on_a_constructed_odgt(tmp_path):
    (tmp_path / "Images").mkdir()
    cv2.imwrite(str(tmp_path / "Images" / "273271,abc.jpg"), np.zeros((100, 120, 3), np.uint8))
    entry = {"ID": "273271,abc", "gtboxes": [
        {"tag": "person", "fbox": [10, 20, 30, 100], "vbox": [12, 22, 20, 40], "hbox": [15, 20, 10, 10],
         "head_attr": {"ignore": 0, "occ": 0, "unsure": 0}, "extra": {"ignore": 0, "occ": 1}},
        {"tag": "mask", "fbox": [80, 0, 30, 30], "vbox": [80, 0, 30, 30], "hbox": [80, 0, 5, 5]},
        {"tag": "person", "fbox": [-10, 50, 40, 40], "vbox": [0, 50, 30, 40], "hbox": [0, 50, 8, 8],
         "extra": {"ignore": 1}},
    ]}
    (tmp_path / "annotation_train.odgt").write_text(json.dumps(entry) + "\n")
    records, problems = read_crowdhuman(tmp_path, "train", box_type="full")
    assert not problems and len(records) == 1
    r = records[0]
    # the full box (xywh -> xyxy) goes beyond the image bottom (120 > 99): the training transform clips it
    assert r.boxes.tolist() == [[10.0, 20.0, 40.0, 120.0]]
    assert r.ignore_boxes.tolist() == [[80.0, 0.0, 110.0, 30.0], [-10.0, 50.0, 30.0, 90.0]]
    assert r.point_boxes["visible_boxes"].tolist() == [[12.0, 22.0, 32.0, 62.0]]
    raw = {"image": np.zeros((100, 120, 3), np.uint8), "points": r.points, "boxes": r.boxes,
           "ignore_boxes": r.ignore_boxes, "point_attrs": {}, "meta": {"name": r.name}}
    out = ShortSideTrainTransform((100, 100), hflip=0.0, seed=0)(raw)
    assert out["boxes"].tolist() == [[10.0, 20.0, 40.0, 99.0]]
    assert len(out["ignore_boxes"]) == 2


def test_cis_with_its_own_masks_as_predictions_gives_ap_100(shared_data):
    from crowdseg.metrics.mask_ap import evaluate_coco_json

    path = shared_data / "cis_crowdhuman_instance_masks" / "CIS.json"
    data = json.loads(path.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    detections = []
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects([p for p in ann["segmentation"] if len(p) >= 6], h, w))
        rle["counts"] = rle["counts"].decode("ascii")
        detections.append({"image_id": ann["image_id"], "category_id": 1, "segmentation": rle, "score": 1.0})
    assert len(detections) == 3453
    result = evaluate_coco_json(path, detections)
    for key in ("ap", "ap50", "ap75", "aps", "apm", "apl"):
        assert result[key] == pytest.approx(1.0), key
