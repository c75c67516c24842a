"""SemiSupervisedDataModule, DetectionDataModule and batch sizes (one process)."""
from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

from pathlib import Path

import pytest

from crowdseg.config import load_config
from crowdseg.errors import ConfigError, DataError
from crowdseg.methods import boxinst, xmask
from data_fixtures import CROWDHUMAN_ID, make_cclabeler, make_crowdhuman
from datamodules.dataset import build_dataset
from datamodules.detection import DetectionDataModule
from datamodules.distributed import CycleDistributedSampler, per_rank_batch_size
from datamodules.semi import SemiSupervisedDataModule

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def crowd_folder(tmp_path):
    points = {f"im{k:02d}": [(8.0 + k, 9.0), (30.0, 20.0 + k)] for k in range(12)}
    return make_cclabeler(tmp_path / "cc", points, size=(48, 64))


def semi_datasets(crowd_folder, tmp_path, n_labeled=3):
    """The labeled and unlabeled training sets as a run builds them (`crowdseg.methods.xmask.build_datamodule`
    over `crowdseg.data.plan_split`), the labeled images named by a split file (`data.labeled_list`)."""
    listing = tmp_path / "splits" / "cclabeler" / "labeled_25_seed0.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("".join(f"im{k:02d}.jpg\n" for k in range(n_labeled)))
    cfg = load_config(EXPERIMENTS / "xmask" / "synthetic.yaml", [
        "data.name=cclabeler", f"data.root={crowd_folder}", "data.train_split=all", "data.val_split=all",
        "data.test_split=all", "data.val_fraction=0", "data.label_fraction=100", f"data.labeled_list={listing}",
        "data.crop_size=32", "data.num_workers=0", "seed=0",
        "trainer.max_steps=1"])  # phase 1 only: the labeled images need no instance masks
    dm = xmask.build_datamodule(cfg)
    assert isinstance(dm, SemiSupervisedDataModule)
    return dm.labeled, dm.unlabeled


def test_semi_datasets_from_a_split_file(crowd_folder, tmp_path):
    labeled, unlabeled = semi_datasets(crowd_folder, tmp_path)
    assert labeled.names == ["im00.jpg", "im01.jpg", "im02.jpg"] and len(unlabeled) == 9
    assert "image_strong" in unlabeled[0] and "image_strong" not in labeled[0]


def test_semi_epoch_is_one_unlabeled_pass_and_labeled_cycles(crowd_folder, tmp_path):
    labeled, unlabeled = semi_datasets(crowd_folder, tmp_path)
    dm = SemiSupervisedDataModule(labeled, unlabeled, val=labeled, labeled_batch_size=2, unlabeled_batch_size=4)
    loader = dm.train_dataloader()
    unl_seen, lab_seen = [], Counter()
    batches = list(loader)
    assert len(batches) == 3  # ceil(9 / 4)
    for batch, _, _ in batches:
        lab, unl = batch["labeled"], batch["unlabeled"]
        assert lab["image"].shape == (2, 3, 32, 32)
        assert unl["image_strong"].shape == unl["image"].shape and unl["cutout"].shape[1:] == (32, 32)
        unl_seen += [m["name"] for m in unl["meta"]]
        lab_seen.update(m["name"] for m in lab["meta"])
    assert sorted(unl_seen) == sorted(unlabeled.names)  # every unlabeled image exactly once
    assert sum(lab_seen.values()) == 6 and set(lab_seen) == set(labeled.names)  # 3 labeled images, cycled
    assert max(lab_seen.values()) - min(lab_seen.values()) <= 1


def test_semi_rejects_overlap_empty_sets_and_indivisible_batches(crowd_folder, tmp_path):
    labeled, unlabeled = semi_datasets(crowd_folder, tmp_path)
    with pytest.raises(DataError, match="3 image\\(s\\) are both labeled and unlabeled, e.g. im00.jpg"):
        SemiSupervisedDataModule(labeled, labeled)
    with pytest.raises(DataError, match="the unlabeled training set is empty"):
        SemiSupervisedDataModule(labeled, unlabeled.subset([]))
    dm = SemiSupervisedDataModule(labeled, unlabeled, labeled_batch_size=4, unlabeled_batch_size=6)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=1)
    with pytest.raises(ConfigError, match="key 'data.unlabeled_batch_size': global batch size 6 is not divisible by the world size 4"):
        dm.train_dataloader()


def test_per_rank_batch_size():
    assert per_rank_batch_size(8, 2) == 4
    with pytest.raises(ConfigError, match="key 'data.batch_size': global batch size 6 is not divisible by the world size 4"):
        per_rank_batch_size(6, 4)


def test_cycle_sampler_shards_are_disjoint_and_cycle():
    data = list(range(7))
    shards = []
    for rank in range(2):
        s = CycleDistributedSampler(data, num_samples=10, num_replicas=2, rank=rank, seed=5)
        s.set_epoch(3)
        idx = list(s)
        assert len(idx) == 10
        shards.append(set(idx))
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(data)
    s = CycleDistributedSampler(data, 10, 2, 0, seed=5)
    assert list(s) != (s.set_epoch(1) or list(s))  # reshuffled each epoch


def _cis_for(tmp_path, file_names):
    data = {"images": [{"id": i, "file_name": n, "height": 80, "width": 100} for i, n in enumerate(file_names)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 20, 30],
                             "segmentation": [[10, 10, 30, 10, 30, 40, 10, 40]], "area": 600}
                            for i in range(len(file_names))],
            "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "cis").mkdir()
    (tmp_path / "cis" / "CIS.json").write_text(json.dumps(data))
    return tmp_path / "cis"


def test_detection_datamodule_excludes_cis_images_from_training(tmp_path):
    root = make_crowdhuman(tmp_path / "ch")
    cis = _cis_for(tmp_path, [f"{CROWDHUMAN_ID}.jpg"])
    cfg = load_config(EXPERIMENTS / "boxinst" / "crowdhuman.yaml", [
        f"data.root={root}", f"boxinst.eval_data.root={cis}", f"boxinst.eval_data.reader_options.image_dir={root / 'Images'}",
        "boxinst.model.pretrained=null", "boxinst.input.train_short_side=null", "boxinst.input.test_short_side=null",
        "data.crop_size=null", "data.scale_range=[0.8,1.2]", "data.max_size=null", "data.batch_size=1",
        "data.num_workers=0"])
    dm = boxinst.build_datamodule(cfg)
    assert dm.datasets["train"].names == ["273271,def.jpg"]
    assert dm.datasets["val"].names == [f"{CROWDHUMAN_ID}.jpg"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["boxes"][0].shape == (1, 4) and batch["image"].shape[0] == 1
    val = next(iter(dm.val_dataloader()))
    assert val["instance_map"][0].shape == (96, 128) and val["instance_map"][0].max() == 1  # padded to 32
    full_train = build_dataset("crowdhuman", str(root), "train")
    with pytest.raises(DataError, match=r"1 val image\(s\) are also in the training set, e.g. 273271,abc.jpg"):
        DetectionDataModule(full_train, dm.datasets["val"])
