"""A 2-process DDP (gloo, CPU) BoxInst run: training steps with the FCOS normaliser averaged over ranks
and validation metrics (mask AP, box AP, overlap) gathered from both ranks."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from crowdseg.config.load import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "boxinst"
TINY = ["boxinst.model.backbone=resnet10t", "boxinst.model.fpn_channels=32", "boxinst.model.head_convs=1",
        "boxinst.model.mask_branch_channels=16", "boxinst.model.mask_branch_convs=1", "data.synthetic.num_train=4",
        "data.synthetic.num_val=3", "data.synthetic.num_test=2", "data.synthetic.height=64",
        "data.synthetic.width=64", "data.synthetic.min_people=4", "data.synthetic.max_people=8",
        "data.batch_size=4", "data.num_workers=0", "boxinst.loss.overlap_weight=2.0"]


class _Record(L.Callback):
    """Rank 0 writes what both ranks saw: the metrics and a parameter checksum per rank."""

    def __init__(self, out: Path):
        self.out = out

    def on_validation_epoch_end(self, trainer, module):
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
        sums = module.all_gather(checksum).reshape(-1).tolist()
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.out.write_text(json.dumps({"world_size": trainer.world_size, "checksums": sums,
                                            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}))


@pytest.mark.slow
def test_two_process_ddp_step_and_validation(tmp_path):
    from crowdseg.methods.boxinst import build

    cfg = load_config(EXPERIMENTS / "synthetic.yaml", TINY)
    job = build(cfg, tmp_path)
    out = tmp_path / "ddp.json"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[_Record(out)],
                        check_val_every_n_epoch=1, limit_train_batches=1)
    trainer.fit(job.module, datamodule=job.datamodule)
    record = json.loads(out.read_text())
    assert record["world_size"] == 2
    a, b = record["checksums"]
    assert a == pytest.approx(b, rel=1e-9)  # both ranks hold the same weights after the steps
    for key in ("val/mask_ap", "val/box_ap", "val/overlap", "train/loss"):
        assert key in record["metrics"], key
