"""Pieces the counting LightningModules share: end-of-stage metrics, the optimizer, point cropping."""
from __future__ import annotations

import math

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import torch
from torch import nn
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


SCHEDULES = ("step", "cosine")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at optimizer step `step`: linear from 1/(warmup+1) to 1 over `warmup_steps`,
    then a cosine from 1 to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adam_with_backbone_lr(model: nn.Module, backbone: nn.Module, optim: Mapping[str, Any]) -> dict[str, Any]:
    """Adam with `lr` for the heads and `backbone_lr` for `backbone`; schedule "step" (StepLR per epoch,
    the papers') or "cosine" (`warmup_cosine` per optimizer step over `total_steps`).

    optim: {"lr", "backbone_lr", "weight_decay", "step_size", "gamma"[, "schedule", "warmup_steps",
    "total_steps"]}. The step budget comes from the config (trainer.max_steps), not from
    `trainer.estimated_stepping_batches`: that sets the training loader up before a resumed run's
    loader state is restored, which breaks exact continuation.
    """
    backbone_params = list(backbone.parameters())
    backbone_ids = {id(p) for p in backbone_params}
    rest = [p for p in model.parameters() if id(p) not in backbone_ids]
    optimizer = torch.optim.Adam([{"params": rest, "lr": optim["lr"]},
                                  {"params": backbone_params, "lr": optim["backbone_lr"]}],
                                 weight_decay=optim["weight_decay"])
    if optim.get("schedule", "step") == "cosine":
        total, warmup = int(optim.get("total_steps") or 0), int(optim.get("warmup_steps", 0))
        if total < 1:
            raise ValueError("optim.schedule=cosine needs total_steps >= 1 (trainer.max_steps)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, optim["step_size"], optim["gamma"])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def inside_image(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N,) bool: points (N, 2) xy whose pixel (round(y), round(x)) lies in an (height, width) image."""
    x, y = points[:, 0], points[:, 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
