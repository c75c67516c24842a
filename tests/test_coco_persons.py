"""BoxInst on real people: the YOLO segmentation reader, several datasets read as one, the masks
predicted for ground-truth boxes (scored apart from detection), iscrowd regions in mask AP and the
overlapping-people training subset. Small files written here; no training."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crowdseg.config.load import load_config
from crowdseg.errors import ConfigError, DataError
from data_fixtures import make_coco
from datamodules.dataset import build_dataset
from datamodules.readers import READERS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "boxinst"
PERSON = "0 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6"  # a 16 x 15 px square on a 40 x 30 image


def make_yolo(root: Path, labels: dict[str, str | None], orphans: tuple[str, ...] = (), split: str = "train") -> Path:
    """Images `<stem>.jpg` (40 x 30) with the given label text (None: no label file), plus label files
    without an image."""
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for stem, text in labels.items():
        cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), np.full((30, 40, 3), 128, np.uint8))
        if text is not None:
            (root / "labels" / split / f"{stem}.txt").write_text(text)
    for stem in orphans:
        (root / "labels" / split / f"{stem}.txt").write_text(PERSON + "\n")
    return root


# ---------------------------------------------------------------------------------------- YOLO reader

def test_yolo_reader_polygons_classes_missing_labels_and_orphans(tmp_path):
    root = make_yolo(tmp_path / "yolo", {
        "a": f"{PERSON}\n2 0.6 0.6 0.9 0.6 0.9 0.9\n0 -0.2 0.5 0.3 0.5 0.3 1.4 -0.2 1.4\n",  # class 2 skipped, one clipped
        "b": "0 1.2 1.2 1.5 1.2 1.5 1.5\n",                                               # wholly outside the image
        "c": None,                                                                       # no label file: nobody
        "d": f"{PERSON}\n0 0.1 abc 0.2\n",                                                # a line that does not parse
    }, orphans=("lost",))
    records, problems = READERS["yolo_seg"](root, "train")
    by_name = {r.name: r for r in records}
    assert sorted(by_name) == ["a.jpg", "c.jpg"]
    a = by_name["a.jpg"]
    assert a.size == (30, 40) and len(a.points) == 2
    np.testing.assert_allclose(a.boxes[0], [4, 3, 20, 18])
    np.testing.assert_allclose(a.boxes[1], [0, 15, 12, 30])          # clipped onto the image border
    ds = build_dataset("yolo_seg", str(root), "train", on_bad_annotation="skip")
    sample = ds[ds.names.index("a.jpg")]
    ids = sample["instance_map"]
    for k, (x, y) in enumerate(sample["points"].round().long().tolist()):
        assert ids[y, x] == k + 1                                     # each point lies in its own mask
    assert len(by_name["c.jpg"].points) == 0
    messages = [str(p) for p in problems]
    assert any("lost.txt" in m and "without an image" in m for m in messages)
    assert any(m.startswith(str(root / "labels/train/b.txt") + ":1") and "no area" in m for m in messages)
    assert any(m.startswith(str(root / "labels/train/d.txt") + ":2") for m in messages)
    with pytest.raises(DataError, match="data.on_bad_annotation"):
        build_dataset("yolo_seg", str(root), "train")                 # the default policy fails loudly


def test_yolo_reader_class_filter_and_missing_folder(tmp_path):
    root = make_yolo(tmp_path / "yolo", {"a": f"{PERSON}\n{PERSON.replace('0 ', '3 ', 1)}\n"})
    assert len(READERS["yolo_seg"](root, "train")[0][0].points) == 1
    assert len(READERS["yolo_seg"](root, "train", class_ids=[0, 3])[0][0].points) == 2
    with pytest.raises(DataError, match="images/val"):
        READERS["yolo_seg"](root, "val")


# ------------------------------------------------------------------------------------ union of sets

def _union_config(tmp_path: Path, overrides: tuple[str, ...] = ()):
    make_yolo(tmp_path / "sets" / "yolo", {f"y{i}": PERSON + "\n" for i in range(10)})
    make_coco(tmp_path / "sets" / "coco")
    (tmp_path / "u.yaml").write_text(f"""
method: boxinst
data:
  name: union
  root: {tmp_path / 'sets'}
  sources:
    - {{tag: small_coco, name: coco, root: coco, splits: [train, test]}}
    - {{name: yolo_seg, root: yolo, split: train, splits: [train]}}
  val_fraction: 50
  on_bad_annotation: fail
""")
    return load_config(tmp_path / "u.yaml", list(overrides))


def test_union_carves_val_from_both_sources_and_records_them(tmp_path):
    from crowdseg.data import plan_split, split_names, with_label_record

    cfg = _union_config(tmp_path)
    names = split_names(cfg, "train")
    assert sorted(names) == sorted(["small_coco/a.jpg", "small_coco/b.jpg", *(f"yolo/y{i}.jpg" for i in range(10))])
    assert split_names(cfg, "test") == ["small_coco/a.jpg", "small_coco/b.jpg"]   # yolo is a training source only
    split = plan_split(cfg)
    assert {n.split("/")[0] for n in split.val} == {"small_coco", "yolo"}
    assert not set(split.val) & set(split.labeled)
    sources = with_label_record(cfg, split, len(split.val)).labels.sources
    assert sources["small_coco"]["val"] + sources["yolo"]["val"] == len(split.val) == 6
    assert sources["small_coco"]["labeled"] + sources["yolo"]["labeled"] == 6
    sample = build_dataset("union", cfg.data.root, "train", sources=list(cfg.data.sources))[0]
    assert sample["meta"]["name"].startswith(("small_coco/", "yolo/"))


def test_union_errors_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[1\].tag"):
        READERS["union"](tmp_path, "train", [{"name": "coco", "root": "x"}, {"name": "yolo_seg", "root": "x"}])
    with pytest.raises(DataError, match=r"data.sources\[0\].name"):
        READERS["union"](tmp_path, "train", [{"name": "nope", "root": "x"}])
    with pytest.raises(DataError, match="data.sources"):
        READERS["union"](tmp_path, "train", [])


def test_coco_persons_recipes_resolve():
    cfg = load_config(EXPERIMENTS / "coco_persons.yaml")
    assert cfg.data.name == "union" and [s["tag"] for s in cfg.data.sources] == ["coco_mini", "coco128_seg", "coco_mini_val"]
    ft = load_config(EXPERIMENTS / "coco_persons_overlap.yaml")
    assert ft.boxinst.train_images == "overlapping" and ft.boxinst.loss.overlap_weight == 2.0
    with pytest.raises(ConfigError, match="boxinst.train_images"):
        load_config(EXPERIMENTS / "synthetic.yaml", ["boxinst.train_images=overlapping"])


# --------------------------------------------------------------------------- masks on ground-truth boxes

def test_paired_mask_iou():
    from crowdseg.metrics.detection import PairedMaskIoU, paired_mask_iou

    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True
    gt[1, :, :] = True
    pred = gt.clone()
    pred[1, :2] = False
    assert paired_mask_iou(pred, gt).tolist() == [1.0, 0.5, 0.0]
    metric = PairedMaskIoU("x_")
    metric.update([pred], [gt])                    # the empty ground truth (row 2) is left out
    out = metric.compute()
    assert out["x_mask_iou"] == pytest.approx(0.75) and out["x_instances"] == 2


def _tiny_job():
    from test_boxinst_module import TINY

    from crowdseg.methods.boxinst import build

    job = build(load_config(EXPERIMENTS / "synthetic.yaml", TINY), None)
    job.datamodule.setup("fit")
    return job


def test_gt_box_locations_pick_the_best_assigned_location_or_the_nearest_p3_cell():
    from crowdseg.lit.boxinst import gt_box_locations
    from crowdseg.losses.fcos import fcos_targets

    model = _tiny_job().module.model.eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 64))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 56.0], [50.0, 50.0, 51.0, 51.0]])   # a person, and a box smaller than a cell
    assigned = fcos_targets(outputs["locations"], outputs["levels"], model.strides, boxes, None, None,
                            model.sizes_of_interest, 1.5).gt_index
    mine = torch.nonzero(assigned == 0).flatten()
    assert len(mine) > 1 and not (assigned == 1).any()
    outputs["cls_logits"][0, :, 0] = -10.0
    outputs["cls_logits"][0, mine[1], 0] = 5.0                                   # the best of box 0's locations
    locations, scores = gt_box_locations(outputs, 0, boxes, model.strides, model.sizes_of_interest, 1.5)
    assert locations[0] == mine[1]
    p3 = outputs["levels"] == 0
    distance = (outputs["locations"] - torch.tensor([50.5, 50.5])).norm(dim=1).masked_fill(~p3, 1e9)
    assert locations[1] == distance.argmin()
    assert scores.shape == (2,) and scores[0] > scores[1]


def test_gt_box_evaluation_scores_gt_masks_at_iou_1_and_filled_boxes_below():
    from crowdseg.lit.boxinst import filled_boxes

    job = _tiny_job()
    module = job.module
    batch = next(iter(job.datamodule.val_dataloader()))

    def the_truth(batch, outputs, sizes):
        out = []
        for ids, boxes, (h, w) in zip(batch["instance_map"], module._boxes(batch), batch["image_size"].tolist()):
            masks = torch.stack([ids[:h, :w] == k + 1 for k in range(len(boxes))])
            out.append({"masks": masks, "filled": filled_boxes(boxes, (h, w)), "scores": torch.ones(len(boxes))})
        return out

    module.gt_box_masks = the_truth
    module._eval_step("val", batch, 0)
    iou, fill = module.gtbox_iou["val"].compute(), module.gtboxfill_iou["val"].compute()
    assert iou["gtbox_mask_iou"] == pytest.approx(1.0) and iou["gtbox_instances"] > 0
    assert 0.2 < fill["gtboxfill_mask_iou"] < 0.95
    assert module.gtbox_ap["val"].compute()["gtbox_mask_ap"] == pytest.approx(1.0)
    assert module.gtboxfill_ap["val"].compute()["gtboxfill_mask_ap"] < 1.0


def test_real_gt_box_masks_stay_inside_their_boxes():
    from crowdseg.lit.boxinst import filled_boxes

    job = _tiny_job()
    module = job.module.eval()
    batch = next(iter(job.datamodule.val_dataloader()))
    with torch.no_grad():
        outputs = module.model(torch.nn.functional.pad(batch["image"], (0, -batch["image"].shape[-1] % 32, 0,
                                                                        -batch["image"].shape[-2] % 32)))
    sizes = [tuple(m.shape[-2:]) for m in module._targets(batch)]
    for out, boxes, size in zip(module.gt_box_masks(batch, outputs, sizes), module._boxes(batch), sizes):
        assert out["masks"].shape == out["filled"].shape == (len(boxes), *size)
        assert not (out["masks"] & ~filled_boxes(boxes, size)).any()


# -------------------------------------------------------------------------------- iscrowd / overlaps

def test_mask_ap_ignores_detections_inside_crowd_regions():
    from crowdseg.metrics.torch_metrics import MaskAP

    person = torch.zeros(1, 20, 20, dtype=torch.bool)
    person[0, 2:8, 2:8] = True
    stray = torch.zeros(1, 20, 20, dtype=torch.bool)
    stray[0, 12:18, 12:18] = True
    preds = [{"masks": torch.cat([stray, person]), "scores": torch.tensor([0.9, 0.8])}]
    plain, crowd = MaskAP(), MaskAP()
    plain.update(preds, [{"masks": person}])
    crowd.update(preds, [{"masks": person, "crowd_masks": stray}])
    assert plain.compute()["mask_ap"] < 0.9                 # the stray detection is a false positive ...
    assert crowd.compute()["mask_ap"] == pytest.approx(1.0)  # ... unless it lies in an iscrowd region


def test_boxes_overlap():
    from crowdseg.methods.boxinst import boxes_overlap

    assert boxes_overlap(np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32))
    assert not boxes_overlap(np.array([[0, 0, 10, 10], [10, 0, 20, 10]], np.float32))   # touching is not overlapping
    assert not boxes_overlap(np.zeros((1, 4), np.float32))


# -------------------------------------------------------------------- any COCO folder is a test set

def test_a_checkpoint_alone_scores_any_coco_folder(tmp_path, capsys):
    import json

    from test_boxinst_module import TINY

    from crowdseg.cli import main
    from crowdseg.train import train

    # val carved from the training images, as in every real-data recipe (the test set's reader has no splits)
    result = train(load_config(EXPERIMENTS / "synthetic.yaml", TINY + [f"runs_root={tmp_path / 'runs'}",
                                                                       "trainer.max_steps=2", "data.val_fraction=50"]))
    ckpt = Path(result["run_dir"]) / "checkpoints" / "last.ckpt"
    coco = make_coco(tmp_path / "mine")                 # instances.json with its images in images/ beside it
    assert main(["test", "--ckpt", str(ckpt), "data.name=coco", f"data.root={coco}", "data.test_split=all"]) == 0
    record = json.loads((Path(result["run_dir"]) / "metrics" / "test.json").read_text())
    assert record["images"] == 2
    assert {"test/mask_ap50", "test/boxfill_mask_ap50", "test/gtbox_mask_iou", "test/gtboxfill_mask_iou"} <= set(record["metrics"])
    assert record["metrics"]["test/gtboxfill_instances"] == 3          # a.jpg's two people and b.jpg's one
