"""Pieces the counting LightningModules share: end-of-stage metrics, logging, point cropping."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import lightning as L
import torch
from torchmetrics import Metric

from crowdseg.metrics import write_metrics_json


class StageHooks:
    """Routes Lightning's validation / test hooks to `_eval_step(stage, batch, batch_idx)` and
    `_end_stage(stage)`, which a module defines once for both stages."""

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch, batch_idx)

    def on_validation_epoch_end(self):
        self._end_stage("val")

    def on_test_epoch_end(self):
        self._end_stage("test")


def log_losses(module: L.LightningModule, losses: Mapping[str, torch.Tensor], batch_size: int) -> None:
    """Log `train/loss` (on the progress bar) and every other entry of `losses` as `train/<key>`."""
    module.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
    module.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=batch_size)


def finish_stage(module: L.LightningModule, stage: str, metrics: Sequence[Metric], run_dir: Optional[Path],
                 keep: Callable[[str], bool] = lambda key: True) -> dict[str, float]:
    """Compute, log as `<stage>/<key>` and reset `metrics`; write `<run_dir>/metrics/<stage>.json`
    (`{"split", "step", "epoch", "checkpoint", "metrics": {"<stage>/<key>": value}}`).

    Call it on every rank (the metrics synchronise inside `compute`). Only rank 0 writes the file,
    and not during Lightning's sanity check. `keep(key)` filters the keys of the metrics' results.
    Returns the logged values as floats.
    """
    values: dict[str, float] = {}
    for metric in metrics:
        for key, value in metric.compute().items():
            if keep(key):
                values[f"{stage}/{key}"] = float(value)
        metric.reset()
    module.log_dict(values, sync_dist=False)  # already synchronised by the metrics
    write_stage_metrics(module, stage, values, run_dir)
    return values


def write_stage_metrics(module: L.LightningModule, stage: str, values: Mapping[str, float],
                        run_dir: Optional[Path]) -> None:
    """`<run_dir>/metrics/<stage>.json` = {"split", "step", "epoch", "checkpoint", "metrics"}, on rank 0,
    outside the sanity check. `crowdseg validate/test` then adds the checkpoint, image count and label
    split (crowdseg.train.evaluate)."""
    trainer = module.trainer
    if run_dir is not None and trainer.is_global_zero and not trainer.sanity_checking:
        write_metrics_json(run_dir, stage, {"split": stage, "step": trainer.global_step, "epoch": trainer.current_epoch,
                                            "checkpoint": "in training" if trainer.state.fn == "fit" else None,
                                            "metrics": dict(values)})


def inside_image(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N,) bool: points (N, 2) xy whose pixel (round(y), round(x)) lies in an (height, width) image."""
    x, y = points[:, 0], points[:, 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
