"""Each DataModule under 2-process DDP (CPU, gloo): ranks see disjoint samples.

Two processes are started once, the way torchrun starts them (RANK / LOCAL_RANK / WORLD_SIZE set),
and each fits a Lightning Trainer(strategy="ddp", devices=2) on every DataModule in turn, so the
DistributedSampler is injected by Lightning exactly as in a real run.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from crowdseg.config import load_config
from crowdseg.methods import boxinst
from data_fixtures import make_cclabeler, write_image
from datamodules.crowd import CrowdDataModule
from datamodules.dataset import build_dataset
from datamodules.semi import SemiSupervisedDataModule
from datamodules.transforms import EvalTransform, TrainTransform, TwoViewTransform

pytestmark = pytest.mark.slow

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


class NameRecorder(L.LightningModule):
    """Records the image names each rank is fed, and writes them to <out>/rank<r>.json."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[str, list[str]] = {}

    def _record(self, key: str, batch: dict) -> None:
        self.seen.setdefault(key, []).extend(m["name"] for m in batch["meta"])

    def training_step(self, batch, batch_idx):
        if "labeled" in batch:
            self._record("labeled", batch["labeled"])
            self._record("unlabeled", batch["unlabeled"])
            assert batch["unlabeled"]["image_strong"].shape == batch["unlabeled"]["image"].shape
        else:
            self._record("train", batch)
        return self.weight.sum() * 0.0

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)

    def on_fit_end(self):
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def build_datamodules(root: Path) -> dict:
    """The three DataModules over the fixture folders under `root` (identical in every process)."""
    folder = root / "cc"
    train = build_dataset("cclabeler", str(folder), "all", names=[f"im{k:02d}.jpg" for k in range(8)],
                          transform=TrainTransform(32, seed=0))
    val = build_dataset("cclabeler", str(folder), "all", names=[f"im{k:02d}.jpg" for k in range(8, 12)],
                        transform=EvalTransform())
    full = build_dataset("cclabeler", str(folder), "all")
    labeled = full.subset([f"im{k:02d}.jpg" for k in range(4)], TrainTransform(32, seed=0))
    unlabeled = full.subset([f"im{k:02d}.jpg" for k in range(4, 12)], TwoViewTransform(32, seed=0))
    # the detection DataModule as a BoxInst run builds it: CrowdHuman train minus the CIS images, CIS to evaluate
    detection = load_config(EXPERIMENTS / "boxinst" / "crowdhuman.yaml", [
        f"data.root={root / 'ch'}", f"boxinst.eval_data.root={root / 'cis'}",
        f"boxinst.eval_data.reader_options.image_dir={root / 'ch' / 'Images'}", "boxinst.model.pretrained=null",
        "boxinst.input.train_short_side=null", "boxinst.input.test_short_side=null", "data.crop_size=null",
        "data.scale_range=[0.8,1.2]", "data.max_size=null", "data.batch_size=2", "data.num_workers=0"])
    return {
        "crowd": CrowdDataModule(train, val, batch_size=4, num_workers=0),
        "semi": SemiSupervisedDataModule(labeled, unlabeled, val=labeled.subset(labeled.names, EvalTransform()),
                                         labeled_batch_size=2, unlabeled_batch_size=4),
        "detection": boxinst.build_datamodule(detection),
    }


def run_rank(rank: int, root: str, port: int) -> None:
    """One DDP process (started like torchrun would): fit each DataModule once, record names."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    for name, dm in build_datamodules(Path(root)).items():
        out = Path(root) / "seen" / name
        out.mkdir(parents=True, exist_ok=True)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        trainer.fit(NameRecorder(str(out)), datamodule=dm)


def make_fixtures(root: Path) -> list[str]:
    make_cclabeler(root / "cc", {f"im{k:02d}": [(5.0 + k, 6.0), (20.0, 10.0 + k)] for k in range(12)}, size=(40, 40))
    ids = [f"273271,{k:03x}" for k in range(6)]
    lines = []
    for k, i in enumerate(ids):
        write_image(root / "ch" / "Images" / f"{i}.jpg", 40, 48, seed=k)
        lines.append(json.dumps({"ID": i, "gtboxes": [{"tag": "person", "hbox": [5, 5, 6, 6], "fbox": [2, 2, 20, 30],
                                                       "vbox": [2, 2, 20, 30]}]}))
    (root / "ch" / "annotation_train.odgt").write_text("\n".join(lines))
    cis = {"images": [{"id": k, "file_name": f"{i}.jpg", "height": 40, "width": 48} for k, i in enumerate(ids[4:])],
           "annotations": [{"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 10, 10],
                            "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]} for k in range(2)]}
    (root / "cis").mkdir()
    (root / "cis" / "CIS.json").write_text(json.dumps(cis))
    return ids


def assert_disjoint_cover(seen, key, names):
    a, b = seen[0][key], seen[1][key]
    assert set(a).isdisjoint(b), (key, a, b)
    assert sorted(a + b) == sorted(names)


def test_each_datamodule_gives_ranks_disjoint_shards(tmp_path):
    ids = make_fixtures(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(str(tmp_path), port), nprocs=2, join=True)
    seen = {name: [json.loads((tmp_path / "seen" / name / f"rank{r}.json").read_text()) for r in range(2)]
            for name in ("crowd", "semi", "detection")}
    cc = [f"im{k:02d}.jpg" for k in range(12)]
    assert_disjoint_cover(seen["crowd"], "train", cc[:8])
    assert_disjoint_cover(seen["crowd"], "val", cc[8:])
    assert_disjoint_cover(seen["semi"], "unlabeled", cc[4:])  # one pass over the unlabeled set
    assert_disjoint_cover(seen["semi"], "labeled", cc[:4])  # 2 batches x 1 image per rank, each from its own shard
    assert_disjoint_cover(seen["semi"], "val", cc[:4])
    assert_disjoint_cover(seen["detection"], "train", [f"{i}.jpg" for i in ids[:4]])  # CIS images are not trained on
    assert_disjoint_cover(seen["detection"], "val", [f"{i}.jpg" for i in ids[4:]])
