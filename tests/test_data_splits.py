"""Label-fraction splits: deterministic, disjoint, covering, nested; shipped files; protocol lists."""
from __future__ import annotations

from pathlib import Path

import pytest

from crowdseg.config import load_config
from crowdseg.data import plan_split
from crowdseg.errors import DataError
from data_fixtures import SHARED_DATA, make_jhu
from datamodules.splits import (SPLITS_DIR, labeled_count, main, make_split, official_train_names, read_name_list,
                                split_file_names)

SHIPPED = {"sha": 300, "shb": 400, "qnrf": 1201, "nwpu": 3109}
P2P = Path(__file__).resolve().parents[1] / "experiments" / "p2p" / "synthetic.yaml"
SHA = SHARED_DATA / "shanghaitech" / "part_A"


def sha_split(*overrides):
    """The label split a run on ShanghaiTech part A plans (`crowdseg.data.plan_split`)."""
    return plan_split(load_config(P2P, ["data.name=sha", f"data.root={SHA}", *overrides]))


def test_official_train_lists():
    assert official_train_names("sha")[0] == "IMG_1.jpg" and official_train_names("sha")[-1] == "IMG_300.jpg"
    assert official_train_names("qnrf")[-1] == "img_1201.jpg"
    assert {k: len(official_train_names(k)) for k in SHIPPED} == SHIPPED
    with pytest.raises(DataError, match="no official training list is known for 'jhu'"):
        official_train_names("jhu")


def test_labeled_counts():
    assert [labeled_count(f, 300) for f in (5, 10, 40)] == [15, 30, 120]  # XMask's sha-5 has 15 images
    assert [labeled_count(f, 1201) for f in (5, 10, 40)] == [60, 120, 480]
    assert [labeled_count(f, 3109) for f in (5, 10, 40)] == [155, 311, 1244]
    assert labeled_count(5, 3) == 1
    with pytest.raises(DataError, match=r"label fraction must be in \(0, 100\]"):
        labeled_count(0, 10)


def test_split_properties():
    names = [f"IMG_{i}.jpg" for i in range(1, 301)]
    prev = set()
    for f in (5, 10, 40):
        labeled, unlabeled = make_split(names, f, seed=3)
        assert set(labeled).isdisjoint(unlabeled) and set(labeled) | set(unlabeled) == set(names)
        assert prev <= set(labeled)  # nested
        prev = set(labeled)
    assert make_split(names, 10, 3) == make_split(list(reversed(names)), 10, 3)  # order-independent
    assert make_split(names, 10, 3)[0] != make_split(names, 10, 4)[0]  # the seed matters


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_split_files_match_the_generator(dataset):
    names = official_train_names(dataset)
    for seed in (0, 1, 2):
        for f in (5, 10, 40):
            lab, unl = (read_name_list(SPLITS_DIR / dataset / n) for n in split_file_names(f, seed))
            assert (lab, unl) == make_split(names, f, seed)
            assert len(lab) == labeled_count(f, len(names))
            assert set(lab).isdisjoint(unl) and set(lab) | set(unl) == set(names)  # a pair covers the training list
            assert len(lab) + len(unl) == len(names)


def test_cli_writes_split_files(tmp_path, capsys):
    assert main(["sha", "--fractions", "5", "10", "40", "--seed", "7", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for f in (5, 10, 40) for n in split_file_names(f, 7))
    assert "sha 5% seed 7: 15 labeled / 285 unlabeled" in capsys.readouterr().out
    assert read_name_list(tmp_path / "labeled_5_seed7.txt") == make_split(official_train_names("sha"), 5, 7)[0]
    with pytest.raises(DataError, match="no official training list is known for 'jhu'"):
        main(["jhu", "--seed", "0", "--out", str(tmp_path / "jhu")])


def test_cli_writes_under_the_current_directory_by_default(tmp_path, monkeypatch):
    shipped = sorted(SPLITS_DIR.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["shb", "--fractions", "5", "--seed", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "splits" / "shb").iterdir()) == sorted(split_file_names(5, 3))
    assert sorted(SPLITS_DIR.rglob("*")) == shipped


def test_cli_splits_a_dataset_root(tmp_path):
    root = make_jhu(tmp_path / "jhu")
    assert main(["jhu", "--fractions", "50", "--seed", "0", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    labeled = read_name_list(tmp_path / "out" / "labeled_50_seed0.txt")
    unlabeled = read_name_list(tmp_path / "out" / "unlabeled_50_seed0.txt")
    assert len(labeled) == 1 and sorted(labeled + unlabeled) == ["0001.jpg", "0002.jpg"]


def test_published_protocol_list_drops_in(tmp_path):
    """A list of labeled names only (XMask's protocols/sha-5.txt format) as `data.labeled_list`; unlabeled = the rest."""
    protocol = tmp_path / "sha-5.txt"
    protocol.write_text("IMG_119.jpg\nIMG_42.jpg\n\nIMG_2.jpg")
    split = sha_split(f"data.labeled_list={protocol}")
    assert set(split.labeled) == {"IMG_119.jpg", "IMG_42.jpg", "IMG_2.jpg"} and len(split.unlabeled) == 297
    protocol.write_text("IMG_1.jpg\nIMG_999.jpg\n")
    with pytest.raises(DataError, match=r"sha-5\.txt:2: IMG_999\.jpg \(data\.labeled_list\) is not an image of the 'sha' train split"):
        sha_split(f"data.labeled_list={protocol}")
    protocol.write_text("IMG_1.jpg\nIMG_3.jpg\nIMG_1.jpg\n")
    with pytest.raises(DataError, match=r"sha-5\.txt:3: IMG_1\.jpg is listed twice \(first on line 1\)"):
        sha_split(f"data.labeled_list={protocol}")


def test_inconsistent_split_files_are_rejected(tmp_path):
    """A split file as `data.labeled_list`: it may not share an image with the val list, the labeled and
    unlabeled images cover the training images, and a missing file is named."""
    folder = tmp_path / "sha"
    folder.mkdir()
    (folder / "labeled_5_seed0.txt").write_text("IMG_1.jpg\nIMG_2.jpg\n")
    (folder / "val.txt").write_text("IMG_2.jpg\nIMG_3.jpg\n")
    labeled = f"data.labeled_list={folder / 'labeled_5_seed0.txt'}"
    with pytest.raises(DataError, match=r"labeled_5_seed0\.txt: IMG_2\.jpg is also a val image \(data\.val_list\)"):
        sha_split(labeled, f"data.val_list={folder / 'val.txt'}", "data.val_split=train")
    (folder / "val.txt").write_text("IMG_3.jpg\n")
    split = sha_split(labeled, f"data.val_list={folder / 'val.txt'}", "data.val_split=train")
    assert split.labeled == ("IMG_1.jpg", "IMG_2.jpg") and split.val == ("IMG_3.jpg",)
    assert set(split.unlabeled) == set(official_train_names("sha")) - {"IMG_1.jpg", "IMG_2.jpg", "IMG_3.jpg"}
    assert len(split.labeled) + len(split.unlabeled) + len(split.val) == 300  # every training image, once
    with pytest.raises(DataError, match=r"labeled_10_seed0\.txt: split file not found"):
        sha_split(f"data.labeled_list={folder / 'labeled_10_seed0.txt'}")


def test_real_ucf_cc_50_split_from_root(tmp_path):
    assert main(["ucf_cc_50", "--fractions", "10", "--root", str(SHARED_DATA / "ucf_cc_50"), "--out", str(tmp_path)]) == 0
    assert len(read_name_list(tmp_path / "labeled_10_seed0.txt")) == 5
    assert len(read_name_list(tmp_path / "unlabeled_10_seed0.txt")) == 45
