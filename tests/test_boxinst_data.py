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


def _crowdhuman_and_cis(root: Path) -> tuple[Path, Path]:
    """3 CrowdHuman training images and a CIS-style JSON naming a 4th CrowdHuman image (with polygons)."""
    ch = root / "CrowdHuman"
    (ch / "Images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(4):
        image = rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)
        image[20:70, 30:50] = 200  # a bright "person"
        cv2.imwrite(str(ch / "Images" / f"1,{k}.jpg"), image)
        if k < 3:
            lines.append(json.dumps({"ID": f"1,{k}", "gtboxes": [
                {"tag": "person", "fbox": [28, 18, 24, 70], "vbox": [30, 20, 20, 50], "hbox": [32, 20, 10, 10]},
                {"tag": "mask", "fbox": [0, 0, 10, 10]}]}))
    (ch / "annotation_train.odgt").write_text("\n".join(lines) + "\n")
    cis = root / "CIS.json"
    cis.write_text(json.dumps({"images": [{"id": 7, "file_name": "1,3.jpg", "height": 80, "width": 100}],
                               "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                                                "bbox": [30, 20, 20, 50], "area": 1000,
                                                "segmentation": [[30, 20, 50, 20, 50, 70, 30, 70]]}],
                               "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}))
    return ch, cis


def test_crowdhuman_training_with_cis_evaluation_runs(tmp_path):
    import lightning as L

    from crowdseg.config.load import load_config
    from crowdseg.methods.boxinst import build

    ch, cis = _crowdhuman_and_cis(tmp_path)
    experiments = Path(__file__).resolve().parents[1] / "experiments" / "boxinst"
    cfg = load_config(experiments / "crowdhuman.yaml", [
        f"data.root={ch}", f"boxinst.eval_data.root={cis}", f"boxinst.eval_data.reader_options.image_dir={ch / 'Images'}",
        "boxinst.model.pretrained=null", "boxinst.model.backbone=resnet10t", "boxinst.model.fpn_channels=32",
        "boxinst.model.head_convs=1", "boxinst.model.mask_branch_channels=16", "boxinst.model.mask_branch_convs=1",
        "boxinst.input.train_short_side=[64,72]", "boxinst.input.test_short_side=64", "data.batch_size=2",
        "data.num_workers=0"])
    job = build(cfg, tmp_path / "run")
    dm = job.datamodule
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    sample = dm.datasets["val"][0]
    assert tuple(sample["orig_instance_map"].shape) == (80, 100) and sample["meta"]["valid_size"] == (64, 80)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(job.module, datamodule=dm)
    assert "val/mask_ap" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
