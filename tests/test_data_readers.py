"""Every reader: the real files in ../shared/data (published counts) and small fixture folders."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from crowdseg.errors import ConfigError, DataError
from data_fixtures import (CROWDHUMAN_ID, SHARED_DATA, disc_map, make_cclabeler, make_coco, make_crowdhuman, make_jhu,
                           make_nwpu, make_qnrf, make_sha, make_xmask)
from datamodules.dataset import build_dataset
from datamodules.readers import READERS
from datamodules.readers.coco import cropped_mask, rasterize_instances, segmentation_mask
from datamodules.readers.idmaps import read_id_map, write_id_map_png
from datamodules.types import collate_samples, point_pixels

UCF = SHARED_DATA / "ucf_cc_50"
SHA = SHARED_DATA / "shanghaitech_A_samples"
CITY = SHARED_DATA / "cityuhkx_bev_cclabeler_json"
SHB_JSON = SHARED_DATA / "shanghaitech_B_cclabeler_json"
CIS = SHARED_DATA / "cis_crowdhuman_instance_masks"
NWPU_LOC = SHARED_DATA / "nwpu_crowd_val_localization" / "val_gt_loc.txt"


# ----------------------------------------------------------------------------------------------
# real data: published totals

def test_ucf_cc_50_has_63974_heads_in_50_images():
    records, problems = READERS["ucf_cc_50"](UCF, "all")
    assert problems == []
    assert len(records) == 50
    assert sum(len(r.points) for r in records) == 63974
    assert len(next(r for r in records if r.name == "1.jpg").points) == 4633


def test_ucf_cc_50_points_are_matlab_minus_one():
    records, _ = READERS["ucf_cc_50"](UCF, "all")
    raw = scipy.io.loadmat(UCF / "10_ann.mat")["annPoints"]
    ours = next(r for r in records if r.name == "10.jpg").points
    np.testing.assert_allclose(ours, raw - 1.0, atol=1e-4)


def test_ucf_cc_50_folds_partition_the_images():
    tests = [set(r.name for r in READERS["ucf_cc_50"](UCF, f"fold{k}_test")[0]) for k in range(1, 6)]
    assert [len(t) for t in tests] == [10] * 5
    assert set().union(*tests) == {f"{i}.jpg" for i in range(1, 51)}
    train3 = {r.name for r in READERS["ucf_cc_50"](UCF, "fold3_train")[0]}
    assert train3 == set().union(*tests) - tests[2] and "25.jpg" in tests[2]


def test_ucf_cc_50_out_of_image_points_fail_or_drop():
    """Images 6 and 20 each hold one point far outside the image (published ground truth)."""
    with pytest.raises(DataError, match=r"6_ann\.mat: 1 point\(s\) outside the 1024x768 image"):
        build_dataset("ucf_cc_50", str(UCF), "all")
    ds = build_dataset("ucf_cc_50", str(UCF), "all", on_bad_annotation="drop", progress=False)
    assert len(ds) == 50 and sum(len(r.points) for r in ds.records) == 63974 - 2
    ds = build_dataset("ucf_cc_50", str(UCF), "all", on_bad_annotation="skip", progress=False)
    assert len(ds) == 48 and "6.jpg" not in ds.names and "20.jpg" not in ds.names


def test_shanghaitech_a_samples_counts_and_one_based_offset():
    records, problems = READERS["sha"](SHA, "all")
    assert problems == []
    assert {r.name: len(r.points) for r in records} == {"IMG_1.jpg": 1546, "IMG_4.jpg": 413, "IMG_51.jpg": 569,
                                                        "IMG_167.jpg": 271, "IMG_168.jpg": 915}
    raw = scipy.io.loadmat(SHA / "ground-truth" / "GT_IMG_4.mat")["image_info"][0][0][0][0][0]
    np.testing.assert_allclose(next(r for r in records if r.name == "IMG_4.jpg").points, raw - 1.0, atol=1e-4)
    ds = build_dataset("sha", str(SHA), "all")
    sample = ds[1]  # IMG_4 is grayscale: 3 equal channels
    assert sample["image"].shape == (3, 746, 1024)
    assert torch.equal(sample["image"][0], sample["image"][2])


def test_cityuhkx_bev_cclabeler_has_3166_heads_in_102_images():
    records, problems = READERS["cclabeler"](CITY, "all")
    assert problems == [] and len(records) == 102
    assert sum(len(r.points) for r in records) == 3166
    first = next(r for r in records if r.name == "scene_001_1.jpg")
    np.testing.assert_allclose(first.points[0], [256.0, 203.75])  # JSON coordinates are used as they are
    ds = build_dataset("cclabeler", str(CITY), "all")
    assert ds[0]["image"].shape == (3, 384, 512)


def test_shb_cclabeler_point_just_outside_is_clipped():
    """IMG_389 has x = -1.024, within the 1 px tolerance: kept and clipped onto column 0."""
    ds = build_dataset("cclabeler", str(SHB_JSON), "all")
    record = next(r for r in ds.records if r.name == "IMG_389.jpg")
    assert record.points[:, 0].min() == 0.0
    assert sum(len(r.points) for r in ds.records) == 146
    with pytest.raises(DataError, match=r"IMG_389\.json: 1 point\(s\) outside"):
        build_dataset("cclabeler", str(SHB_JSON), "all", outside_tolerance=0.1)


def test_nwpu_val_localization_196238_heads_in_500_images_and_shipped_lists():
    from crowdseg.metrics.nwpu import read_gt_file
    from datamodules.splits import SPLITS_DIR, nwpu_official_lists, read_name_list

    gt = read_gt_file(NWPU_LOC)
    assert len(gt) == 500 and sum(g.count for g in gt.values()) == 196238
    train, val = nwpu_official_lists(NWPU_LOC)
    assert len(train) == 3109 and len(val) == 500
    assert {int(n[:4]) for n in val} == set(gt)
    assert read_name_list(SPLITS_DIR / "nwpu" / "train.txt") == train
    assert read_name_list(SPLITS_DIR / "nwpu" / "val.txt") == val


@pytest.fixture(scope="module")
def cis_dataset():
    return build_dataset("cis", str(CIS), "all")  # read once: rasterising 3,453 polygons takes a few seconds


def test_cis_has_3453_instances_in_459_images_points_inside_their_masks(cis_dataset):
    records = cis_dataset.records
    assert len(records) == 459
    assert sum(len(r.points) for r in records) == 3453
    first = next(r for r in records if r.name == "273271,c9db000d5146c15.jpg")
    np.testing.assert_allclose(first.boxes[:2], [[72, 202, 72 + 163, 202 + 398], [199, 180, 199 + 144, 180 + 420]])
    for r in records[::23]:
        id_map = rasterize_instances(r.polygons, *r.size)
        rows, cols = point_pixels(torch.from_numpy(r.points), *r.size)
        assert (id_map[rows.numpy(), cols.numpy()] == np.arange(1, len(r.points) + 1)).all(), r.name
        for seg in r.polygons[:3]:  # the cropped rasterisation equals pycocotools on the full image
            y0, x0, m = cropped_mask(seg, *r.size)
            full = np.zeros(r.size, bool)
            full[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = m
            assert np.array_equal(full, segmentation_mask(seg, *r.size))


def test_cis_without_images_names_the_missing_image(cis_dataset):
    with pytest.raises(DataError, match=r"273271,c9db000d5146c15\.jpg is not available"):
        cis_dataset[0]


# ----------------------------------------------------------------------------------------------
# fixture folders for the formats without real files here

def test_jhu_reader_points_head_boxes_attributes_and_labels(tmp_path):
    root = make_jhu(tmp_path / "jhu")
    records, problems = READERS["jhu"](root, "train")
    assert problems == [] and [r.name for r in records] == ["0001.jpg", "0002.jpg"]
    r = records[0]
    np.testing.assert_allclose(r.points, [[10, 12], [20, 5]])
    np.testing.assert_allclose(r.point_boxes["head_boxes"], [[8, 9, 12, 15], [19, 4, 21, 6]])
    assert r.point_attrs["occlusion"].tolist() == [1, 2] and r.point_attrs["blur"].tolist() == [0, 1]
    assert r.labels == {"count": 2, "scene_type": "street", "weather": 0, "distractor": 0}
    assert len(records[1].points) == 0
    joined, _ = READERS["jhu"](root, "train+val")
    assert [x.name for x in joined] == ["train/0001.jpg", "train/0002.jpg", "val/0001.jpg"]
    sample = build_dataset("jhu", str(root), "train")[0]
    assert sample["head_boxes"].shape == (2, 4) and sample["point_attrs"]["occlusion"].tolist() == [1, 2]


def test_jhu_count_mismatch_and_bad_line_are_reported(tmp_path):
    root = make_jhu(tmp_path / "jhu")
    (root / "train/image_labels.txt").write_text("0001,3,street,0,0\n0002,0,marathon,1,1\n")
    with pytest.raises(DataError, match=r"image_labels\.txt: key '0001\.count' says 3 heads but the file has 2 points"):
        build_dataset("jhu", str(root), "train")
    (root / "train/gt/0001.txt").write_text("10 12 4 6 1 0\n20 5 2\n")
    with pytest.raises(DataError, match=r"gt/0001\.txt:2: expected 6 numbers"):
        build_dataset("jhu", str(root), "train")


def test_nwpu_json_reader_splits_boxes_and_unlabeled_test(tmp_path):
    root = make_nwpu(tmp_path / "nwpu")
    records, problems = READERS["nwpu"](root, "train")
    assert problems == [] and [r.name for r in records] == ["0001.jpg", "0002.jpg"]
    np.testing.assert_allclose(records[0].points, [[5, 6], [40.5, 20]])
    np.testing.assert_allclose(records[0].boxes, [[3, 4, 7, 8], [38, 18, 43, 22]])
    assert len(records[1].points) == 0 and records[1].labeled  # a negative sample, not an error
    val, _ = READERS["nwpu"](root, "val")
    assert [r.name for r in val] == ["0003.jpg"] and val[0].image_path.parent.name == "images_part2"
    test, _ = READERS["nwpu"](root, "test")
    assert [r.name for r in test] == ["0004.jpg"] and not test[0].labeled
    ds = build_dataset("nwpu", str(root), "train")
    assert ds[0]["boxes"].shape == (2, 4) and ds[1]["points"].shape == (0, 2)


def test_qnrf_reader_subtracts_one(tmp_path):
    root = make_qnrf(tmp_path / "qnrf")
    records, _ = READERS["qnrf"](root, "train")
    assert [r.name for r in records] == ["img_0001.jpg"]
    np.testing.assert_allclose(records[0].points, [[0, 0], [9, 4]])
    test, _ = READERS["qnrf"](root, "test")
    np.testing.assert_allclose(test[0].points, [[4.5, 5.5]])


def test_shanghaitech_reader_reads_the_ground_truth_spelling(tmp_path):
    root = make_sha(tmp_path / "part_A", folder="ground_truth")
    records, problems = READERS["sha"](root, "train")
    assert problems == [] and [r.name for r in records] == ["IMG_1.jpg", "IMG_2.jpg"]
    np.testing.assert_allclose(records[0].points, [[0, 0], [19, 9]])
    with pytest.raises(DataError, match="no folder for split 'test'"):
        READERS["sha"](root, "test")


def test_crowdhuman_odgt_boxes_points_ignore_regions(tmp_path):
    root = make_crowdhuman(tmp_path / "ch")
    records, problems = READERS["crowdhuman"](root, "train")
    assert problems == [] and [r.name for r in records] == [f"{CROWDHUMAN_ID}.jpg", "273271,def.jpg"]
    r = records[0]
    assert len(r.points) == 3  # the ignored person and the mask region are not instances
    np.testing.assert_allclose(r.points[0], [15, 15])  # head box centre
    np.testing.assert_allclose(r.points[2], [38, 20])  # head above the image: visible-box centre
    np.testing.assert_allclose(r.boxes[0], [5, 5, 35, 75])  # full box by default
    np.testing.assert_allclose(r.point_boxes["visible_boxes"][0], [6, 6, 26, 46])
    np.testing.assert_allclose(r.ignore_boxes, [[68, 2, 78, 32], [80, 60, 95, 75]])
    assert r.point_attrs["head_occ"].tolist() == [1, 0, 0] and r.point_attrs["occ"].tolist() == [0, 1, 1]
    head, _ = READERS["crowdhuman"](root, "train", box_type="head")
    np.testing.assert_allclose(head[0].boxes[0], [10, 10, 20, 20])
    ds = build_dataset("crowdhuman", str(root), "train", exclude_names=["273271,def.jpg"])
    assert ds.names == [f"{CROWDHUMAN_ID}.jpg"] and ds[0]["ignore_boxes"].shape == (2, 4)


def test_crowdhuman_bad_line_names_file_and_line(tmp_path):
    root = make_crowdhuman(tmp_path / "ch")
    with open(root / "annotation_train.odgt", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"annotation_train\.odgt:3: invalid JSON"):
        READERS["crowdhuman"](root, "train")


def test_coco_reader_polygons_rle_and_crowd_regions(tmp_path):
    root = make_coco(tmp_path / "coco")
    records, problems = READERS["coco"](root)
    assert problems == [] and [r.name for r in records] == ["a.jpg", "b.jpg"]
    a, b = records
    assert len(a.points) == 2 and len(b.points) == 1  # iscrowd goes to ignore_boxes
    np.testing.assert_allclose(a.ignore_boxes, [[15, 15, 20, 20]])
    ds = build_dataset("coco", str(root), "all")
    sa, sb = ds[0], ds[1]
    block = np.zeros((30, 40), bool)
    block[20:26, 30:38] = True
    assert np.array_equal(sa["instance_map"].numpy() == 2, block)  # uncompressed RLE
    assert np.array_equal(sb["instance_map"].numpy() == 1, block)  # compressed RLE
    assert (sa["instance_map"].numpy() == 1).sum() == 100  # polygon square 10 x 10
    rows, cols = point_pixels(sa["points"], 30, 40)
    assert sa["instance_map"][rows, cols].tolist() == [1, 2]


def test_xmask_layout_points_and_npy_masks(tmp_path):
    root, id_map = make_xmask(tmp_path / "xm")
    records, problems = READERS["xmask"](root, "train")
    assert problems == [] and [r.name for r in records] == ["IMG_1.jpg", "IMG_2.jpg"]
    np.testing.assert_allclose(records[0].points, [[8, 8], [24, 10], [15, 24]])
    np.testing.assert_allclose(records[1].points, [[3, 4]])
    assert records[1].mask_path is None
    one_based, _ = READERS["xmask"](root, "train", one_based=True)
    np.testing.assert_allclose(one_based[0].points[0], [7, 7])
    sample = build_dataset("xmask", str(root), "train")[0]
    assert np.array_equal(sample["instance_map"].numpy(), id_map)


def test_sixteen_bit_png_id_maps_attach_by_image_stem(tmp_path):
    """300 points: ids above 255 survive the PNG round trip."""
    grid = [(float(x), float(y)) for y in range(2, 60, 4) for x in range(2, 84, 4)][:300]
    root = make_cclabeler(tmp_path / "cc", {"crowd": grid}, size=(64, 88))
    id_map = np.zeros((64, 88), np.int64)
    for k, (x, y) in enumerate(grid):
        id_map[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = k + 1
    write_id_map_png(tmp_path / "masks" / "crowd.png", id_map)
    assert np.array_equal(read_id_map(tmp_path / "masks" / "crowd.png"), id_map)
    ds = build_dataset("cclabeler", str(root), "all", masks_dir=str(tmp_path / "masks"))
    sample = ds[0]
    assert sample["instance_map"].max().item() == 300
    assert np.array_equal(sample["instance_map"].numpy(), id_map)


def test_build_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'shc'"):
        build_dataset("shc", str(tmp_path), "train")
    with pytest.raises(ConfigError, match="needs a root folder"):
        build_dataset("sha", None, "train")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['box_typ'\]"):
        build_dataset("crowdhuman", str(make_crowdhuman(tmp_path / "ch")), "train", box_typ="head")


def test_synthetic_is_one_of_the_datasets_and_batches_collate():
    ds = build_dataset("synthetic", None, "train", num_images=3, height=48, width=64, max_people=10)
    batch = collate_samples([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 48, 64) and len(batch["points"]) == 3
    assert [m["name"] for m in batch["meta"]] == ["train_00000.png", "train_00001.png", "train_00002.png"]


def test_disc_map_helper_marks_discs():
    m = disc_map(9, 9, [(4, 4)], 2)
    assert m[4, 4] == 1 and m[4, 6] == 1 and m[4, 7] == 0 and (m > 0).sum() == 13
