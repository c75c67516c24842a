"""Bad annotations and images: each gives a DataError naming the file (and line / key), or is
skipped / dropped with a printed report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crowdseg.errors import ConfigError, DataError
from data_fixtures import SHARED_DATA, make_cclabeler, make_jhu, make_nwpu, write_image
from datamodules.dataset import build_dataset
from datamodules.readers.idmaps import write_id_map_png

GOOD = {"a": [(5.0, 5.0), (20.0, 30.0)], "b": [(10.0, 10.0)], "c": [(40.0, 40.0), (50.0, 12.0), (3.0, 60.0)]}


@pytest.fixture
def folder(tmp_path):
    return make_cclabeler(tmp_path / "cc", GOOD)


def _set_points(folder, stem, points, human_num=None):
    path = folder / "jsons" / f"{stem}.json"
    data = json.loads(path.read_text())
    data["points"] = [{"x": x, "y": y} for x, y in points]
    data["human_num"] = len(points) if human_num is None else human_num
    path.write_text(json.dumps(data))


def test_valid_folder_loads(folder):
    ds = build_dataset("cclabeler", str(folder), "all")
    assert ds.names == ["a.jpg", "b.jpg", "c.jpg"] and [len(r.points) for r in ds.records] == [2, 1, 3]


def test_point_outside_image(folder):
    _set_points(folder, "b", [(10.0, 10.0), (70.5, 3.0)])
    with pytest.raises(DataError, match=r"jsons/b\.json: 1 point\(s\) outside the 64x64 image, e\.g\. point index 1 at x=70\.50"):
        build_dataset("cclabeler", str(folder), "all")


def test_nan_point(folder):
    _set_points(folder, "c", [(40.0, 40.0), (float("nan"), 12.0), (3.0, 60.0)])
    with pytest.raises(DataError, match=r"jsons/c\.json: 1 point\(s\) are NaN or infinite \(point index 1\)"):
        build_dataset("cclabeler", str(folder), "all")


def test_duplicate_point(folder):
    _set_points(folder, "a", [(5.0, 5.0), (20.0, 30.0), (5.0, 5.0)])
    with pytest.raises(DataError, match=r"jsons/a\.json: 1 duplicate point\(s\), e\.g\. point index 2 repeats x=5\.00 y=5\.00"):
        build_dataset("cclabeler", str(folder), "all", on_duplicate_points="fail")
    dropped = build_dataset("cclabeler", str(folder), "all")  # the default drops the repeat, with a report
    assert len(dropped.records[0].points) == 2


def test_duplicate_report_names_its_setting_and_keep_leaves_every_point(folder, caplog):
    _set_points(folder, "a", [(5.0, 5.0), (20.0, 30.0), (5.0, 5.0), (5.0, 5.0)])
    for policy in ("fail", "skip", "drop"):  # duplicates alone: their own setting, whatever on_bad_annotation says
        caplog.clear()
        assert [len(r.points) for r in build_dataset("cclabeler", str(folder), "all", on_bad_annotation=policy).records] == [2, 1, 3]
        out = caplog.text
        assert "1 annotation problem(s) of cclabeler (on_duplicate_points=drop): kept 3 of 3 images, dropped 2 point(s)" in out
        assert "on_bad_annotation" not in out
    caplog.clear()
    kept = build_dataset("cclabeler", str(folder), "all", on_duplicate_points="keep")
    assert [len(r.points) for r in kept.records] == [4, 1, 3] and caplog.text == ""
    # keep: the other problems still follow on_bad_annotation, the duplicates are none of them
    _set_points(folder, "b", [(10.0, 10.0), (99.0, 3.0)])
    kept = build_dataset("cclabeler", str(folder), "all", on_bad_annotation="drop", on_duplicate_points="keep")
    assert [len(r.points) for r in kept.records] == [4, 1, 3]
    out = caplog.text
    assert "1 annotation problem(s) of cclabeler (on_bad_annotation=drop)" in out and "duplicate point" not in out
    with pytest.raises(ConfigError, match="key 'data.on_duplicate_points': expected one of fail, drop, keep"):
        build_dataset("cclabeler", str(folder), "all", on_duplicate_points="ignore")


def test_the_test_split_keeps_duplicates_that_training_and_val_drop(tmp_path, caplog):
    from pathlib import Path

    from crowdseg.config import load_config
    from crowdseg.data import build_datamodule, build_test_dataset
    from crowdseg.methods.boxinst import _test_dataset

    root = tmp_path / "cc"
    make_cclabeler(root / "train", {"t1": [(5.0, 5.0), (5.0, 5.0), (9.0, 9.0)], "t2": [(3.0, 3.0)]})
    make_cclabeler(root / "test", {"u1": [(7.0, 7.0), (7.0, 7.0), (7.0, 7.0)], "u2": [(1.0, 2.0), (1.0, 2.0)]})
    p2p = Path(__file__).resolve().parents[1] / "experiments" / "p2p" / "synthetic.yaml"
    cfg = load_config(p2p, ["data.name=cclabeler", f"data.root={root}", "data.train_split=train",
                            "data.val_split=test", "data.test_split=test", "data.num_workers=0"])
    assert cfg.data.on_duplicate_points == "drop"
    datamodule = build_datamodule(cfg)
    assert [len(r.points) for r in datamodule.datasets["train"].records] == [2, 1]
    assert [len(r.points) for r in datamodule.datasets["val"].records] == [1, 1]  # selection: the training policy
    caplog.clear()
    for test in (datamodule.dataset("test"), build_test_dataset(cfg), _test_dataset(cfg, None)):
        assert test.names == ["u1.jpg", "u2.jpg"] and [len(r.points) for r in test.records] == [3, 2]
    assert caplog.text == ""  # the published ground truth: nothing dropped, nothing reported


def test_shanghaitech_b_training_duplicates_kept_and_dropped():
    """The official B training ground truth (headers read, nothing decoded): 49,151 heads as published,
    38 of them exact duplicates in 14 files (README); its test half is not in the shared data."""
    root = str(SHARED_DATA / "shanghaitech" / "part_B")
    kept = build_dataset("shb", root, "train", on_duplicate_points="keep", progress=False)
    dropped = build_dataset("shb", root, "train", progress=False)
    counts = [(len(k.points), len(d.points)) for k, d in zip(kept.records, dropped.records)]
    assert sum(k for k, _ in counts) == 49151 and sum(k - d for k, d in counts) == 38
    assert sum(k != d for k, d in counts) == 14


def test_declared_count_mismatch_names_the_key(folder):
    _set_points(folder, "a", [(5.0, 5.0)], human_num=4)
    with pytest.raises(DataError, match=r"jsons/a\.json: key 'human_num' says 4 heads but the file has 1 points"):
        build_dataset("cclabeler", str(folder), "all")


def test_invalid_json_names_line_and_column(folder):
    (folder / "jsons" / "b.json").write_text('{"points": [\n  {"x": 1, "y": }\n]}')
    with pytest.raises(DataError, match=r"jsons/b\.json: invalid JSON at line 2"):
        build_dataset("cclabeler", str(folder), "all")


def test_point_object_without_y_names_the_key(folder):
    (folder / "jsons" / "b.json").write_text(json.dumps({"human_num": 1, "points": [{"x": 3}]}))
    with pytest.raises(DataError, match=r"jsons/b\.json: key 'points\[0\]': a point object needs 'x' and 'y'"):
        build_dataset("cclabeler", str(folder), "all")


def test_image_without_annotation_and_annotation_without_image(folder):
    (folder / "jsons" / "b.json").unlink()
    with pytest.raises(DataError, match=r"images/b\.jpg: image without annotation file"):
        build_dataset("cclabeler", str(folder), "all")
    (folder / "images" / "b.jpg").unlink()
    (folder / "jsons" / "zz.json").write_text(json.dumps({"points": []}))
    with pytest.raises(DataError, match=r"jsons/zz\.json: annotation file without a matching image"):
        build_dataset("cclabeler", str(folder), "all")


def test_empty_and_unreadable_images(folder):
    (folder / "images" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"images/a\.jpg: empty image file \(0 bytes\)"):
        build_dataset("cclabeler", str(folder), "all")
    (folder / "images" / "a.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"images/a\.jpg: unreadable image"):
        build_dataset("cclabeler", str(folder), "all")


def test_truncated_image_at_build_and_a_corrupt_one_at_load(folder):
    path = write_image(folder / "images" / "c.jpg", 64, 64, seed=5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])             # a cut-off download: the header still reads
    with pytest.raises(DataError, match=r"images/c\.jpg: truncated image file"):
        build_dataset("cclabeler", str(folder), "all")
    assert build_dataset("cclabeler", str(folder), "all", on_bad_annotation="skip").names == ["a.jpg", "b.jpg"]
    # complete but corrupt (end marker present): caught by a full decode, at build with
    # verify_images, else when the image is loaded
    path.write_bytes(data[:200] + bytes(len(data) - 202) + data[-2:])
    ds = build_dataset("cclabeler", str(folder), "all")
    with pytest.raises(DataError, match=r"images/c\.jpg: unreadable or truncated image"):
        ds[2]
    with pytest.raises(DataError, match=r"images/c\.jpg: unreadable or truncated image"):
        build_dataset("cclabeler", str(folder), "all", verify_images=True)


def test_instance_map_size_and_ids_are_checked(folder, tmp_path):
    masks = tmp_path / "masks"
    write_id_map_png(masks / "a.png", np.zeros((64, 64), np.int64))
    write_id_map_png(masks / "b.png", np.zeros((32, 64), np.int64))
    c = np.zeros((64, 64), np.int64)
    c[0, 0] = 5  # c has 3 points
    write_id_map_png(masks / "c.png", c)
    with pytest.raises(DataError, match=r"masks/b\.png: instance map is 64x32 but the image is 64x64"):
        build_dataset("cclabeler", str(folder), "all", masks_dir=str(masks))
    write_id_map_png(masks / "b.png", np.zeros((64, 64), np.int64))
    ds = build_dataset("cclabeler", str(folder), "all", masks_dir=str(masks))
    with pytest.raises(DataError, match=r"masks/c\.png: instance id 5 but the image has only 3 points"):
        ds[2]
    (masks / "b.png").unlink()
    with pytest.raises(DataError, match=r"masks/b\.png: no instance map for image b\.jpg"):
        build_dataset("cclabeler", str(folder), "all", masks_dir=str(masks))


def test_skip_reports_and_keeps_the_good_images(folder, caplog, capsys):
    _set_points(folder, "b", [(10.0, 10.0), (99.0, 3.0)])
    (folder / "jsons" / "c.json").unlink()
    ds = build_dataset("cclabeler", str(folder), "all", on_bad_annotation="skip")
    assert ds.names == ["a.jpg"]
    assert capsys.readouterr().out == ""  # a warning of the module's logger, not a print
    out = caplog.text
    assert "2 annotation problem(s) of cclabeler (on_bad_annotation=skip): kept 1 of 2 images" in out
    assert "[skipped]" in out and "b.json: 1 point(s) outside" in out and "c.jpg: image without annotation file" in out


def test_drop_removes_only_bad_points_and_renumbers_the_instance_map(folder, tmp_path, caplog):
    pts = [(40.0, 40.0), (99.0, 12.0), (3.0, 60.0), (40.0, 40.0)]  # index 1 outside, index 3 duplicate
    _set_points(folder, "c", pts)
    masks = tmp_path / "masks"
    for stem, n in (("a", 2), ("b", 1)):
        write_id_map_png(masks / f"{stem}.png", np.zeros((64, 64), np.int64))
    c = np.zeros((64, 64), np.int64)
    c[40, 40], c[12, 63], c[60, 3], c[0, 0] = 1, 2, 3, 4
    write_id_map_png(masks / "c.png", c)
    ds = build_dataset("cclabeler", str(folder), "all", on_bad_annotation="drop", masks_dir=str(masks))
    sample = ds[2]
    np.testing.assert_allclose(sample["points"].numpy(), [[40, 40], [3, 60]])
    m = sample["instance_map"].numpy()
    assert m[40, 40] == 1 and m[60, 3] == 2 and m[12, 63] == 0 and m[0, 0] == 0
    assert "dropped 2 point(s) in 1 image(s)" in caplog.text


def test_unknown_policy_is_a_config_error(folder):
    _set_points(folder, "b", [(10.0, 10.0), (99.0, 3.0)])
    with pytest.raises(ConfigError, match="key 'data.on_bad_annotation': expected one of fail, skip, drop"):
        build_dataset("cclabeler", str(folder), "all", on_bad_annotation="ignore")


def test_nwpu_listed_image_missing_and_box_count_mismatch(tmp_path):
    root = make_nwpu(tmp_path / "nwpu")
    (root / "images_part1" / "0002.jpg").unlink()
    with pytest.raises(DataError, match=r"jsons/0002\.json: image 0002 is listed in train\.txt but no image file"):
        build_dataset("nwpu", str(root), "train")
    root = make_nwpu(tmp_path / "nwpu2")
    (root / "jsons" / "0001.json").write_text(json.dumps({"human_num": 2, "points": [[5, 6], [7, 8]], "boxes": [[1, 2, 3, 4]]}))
    with pytest.raises(DataError, match=r"jsons/0001\.json: key 'boxes' has 1 boxes for 2 points"):
        build_dataset("nwpu", str(root), "train")
    assert build_dataset("nwpu", str(root), "train", on_bad_annotation="skip").names == ["0002.jpg"]


def test_jhu_missing_split_folder(tmp_path):
    root = make_jhu(tmp_path / "jhu")
    with pytest.raises(DataError, match=r"jhu/test: JHU-CROWD\+\+ split 'test' folder not found"):
        build_dataset("jhu", str(root), "test")



class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError("images/x.jpg: unreadable or truncated image (broken data stream)")


def test_an_error_in_a_dataloader_worker_reaches_the_user_as_one_line():
    from crowdseg.cli import one_line

    loader = torch.utils.data.DataLoader(_Broken(), num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)
    assert one_line(info.value) == "images/x.jpg: unreadable or truncated image (broken data stream)"
