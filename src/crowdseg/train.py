"""`train(cfg)` and `evaluate(cfg, stage)`: the pure entry points the CLI and the tests both call."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from omegaconf import DictConfig

from crowdseg.errors import ConfigError
from crowdseg.runs import (AtomicCheckpointIO, build_checkpoint_callbacks, build_loggers, check_checkpoint,
                           last_checkpoint, prepare_run_dir, run_dir)


@dataclass
class Job:
    """What a method contributes to a run: its LightningModule and its DataModule."""
    module: L.LightningModule
    datamodule: L.LightningDataModule


def optim_settings(cfg: DictConfig) -> dict[str, float]:
    """The plain optimizer values a counting LightningModule takes (lit/common.adam_with_backbone_lr)."""
    return {k: cfg.optim[k] for k in ("lr", "backbone_lr", "weight_decay", "step_size", "gamma")}


def build_p2p(cfg: DictConfig, path: Path) -> Job:
    from crowdseg.data import build_datamodule
    from crowdseg.lit.p2p import PointPredictorModule
    from crowdseg.losses.p2p import P2PLoss
    from crowdseg.mask_supervision import point_mask_loss
    from crowdseg.models.backbone import create_backbone
    from crowdseg.models.p2p import PointPredictor

    m, lo = cfg.model, cfg.loss
    model = PointPredictor(create_backbone(m.backbone, m.pretrained, reductions=(8, 16)), m.fpn_channels,
                           m.head_channels, m.anchor_rows, m.anchor_cols, m.regression_scale)
    criterion = P2PLoss(lo.cost_class, lo.cost_point, lo.eos_coef, lo.point_loss_coef)
    datamodule = build_datamodule(cfg)
    module = PointPredictorModule(model, criterion, optim_settings(cfg), lo.score_threshold, path, cfg.logger.num_pictures,
                                  point_mask_loss(cfg, datamodule), cfg.mask_loss.points)
    return Job(module, datamodule)


def build_density(cfg: DictConfig, path: Path) -> Job:
    from crowdseg.data import build_datamodule
    from crowdseg.lit.density import DensityModule
    from crowdseg.losses.density import DensityLoss
    from crowdseg.mask_supervision import density_mask_losses
    from crowdseg.models.backbone import create_backbone
    from crowdseg.models.density import DensityCounter

    m, d = cfg.model, cfg.density
    if d.activation not in ("softplus", "relu"):
        raise ConfigError(f"key 'density.activation': {d.activation!r} is not one of softplus, relu")
    if d.sigma <= 0:
        raise ConfigError(f"key 'density.sigma': must be > 0, got {d.sigma}")
    model = DensityCounter(create_backbone(m.backbone, m.pretrained, reductions=(8,)), list(d.channels), d.activation)
    datamodule = build_datamodule(cfg)
    mask_loss, one_point_loss = density_mask_losses(cfg, datamodule, model.stride)
    module = DensityModule(model, DensityLoss(model.stride, d.sigma), optim_settings(cfg), mask_loss, one_point_loss,
                           cfg.mask_loss.one_point_threshold, path, cfg.logger.num_pictures)
    return Job(module, datamodule)


def build_rps(cfg: DictConfig, path: Path) -> Job:
    from crowdseg.data import build_datamodule
    from crowdseg.lit.rps import rps_module_from_config

    datamodule = build_datamodule(cfg)
    return Job(rps_module_from_config(cfg, path, datamodule), datamodule)


# method name -> builder. A plain dict: adding a method is one line here.
METHODS: dict[str, Callable[[DictConfig, Path], Job]] = {
    "p2p": build_p2p,
    "density": build_density,
    "rps": build_rps,
}


def build_job(cfg: DictConfig, path: Path) -> Job:
    if cfg.method not in METHODS:
        raise ConfigError(f"key 'method': {cfg.method!r} has no training entry point yet "
                          f"(available: {', '.join(sorted(METHODS))})")
    return METHODS[cfg.method](cfg, path)


def build_trainer(cfg: DictConfig, path: Path, job: Job, **overrides: Any) -> L.Trainer:
    trainer_kwargs = {k: v for k, v in dict(cfg.trainer).items() if v is not None}
    trainer_kwargs.update(overrides)
    monitor, mode = getattr(job.module, "monitor", ("val/loss", "min"))
    return L.Trainer(
        default_root_dir=str(path),
        logger=build_loggers(cfg, path),
        callbacks=build_checkpoint_callbacks(path, cfg.checkpoint_every_n_steps, monitor, mode),
        plugins=[AtomicCheckpointIO()],
        # a module with manual optimisation (rps) clips its gradients by hand; Lightning refuses to
        gradient_clip_val=cfg.optim.grad_clip if job.module.automatic_optimization else None,
        **trainer_kwargs,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured method; resume from `<run_dir>/checkpoints/last.ckpt` when it exists.

    Returns the final logged metrics (floats) plus `run_dir` and `checkpoint`.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    path = prepare_run_dir(cfg)
    job = build_job(cfg, path)
    trainer = build_trainer(cfg, path, job)
    resume_from = last_checkpoint(path) if cfg.resume else None
    if resume_from is not None:
        check_checkpoint(resume_from)
    trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=str(resume_from) if resume_from else None)
    metrics = _floats(trainer.callback_metrics)
    if "val/mae" in metrics and trainer.is_global_zero:
        metrics["val/mae_mean_baseline"] = mean_count_baseline(job.datamodule)
    metrics.update(run_dir=str(path), checkpoint=str(last_checkpoint(path) or ""),
                   pictures=str(path / "pictures"), metrics_csv=str(path / "csv" / "metrics.csv"),
                   global_step=trainer.global_step)
    return metrics


def point_counts(dataset) -> list[int]:
    """Ground-truth count of every image of `dataset` (its own `point_counts()` when it has one)."""
    if hasattr(dataset, "point_counts"):
        return list(dataset.point_counts())
    return [len(dataset[i]["points"]) for i in range(len(dataset))]


def mean_count_baseline(datamodule: L.LightningDataModule) -> float:
    """Validation MAE of always predicting the training set's mean count: the bar a counter must beat."""
    train_counts = point_counts(datamodule.datasets["train"])
    mean = sum(train_counts) / max(len(train_counts), 1)
    val_counts = point_counts(datamodule.datasets["val"])
    return sum(abs(c - mean) for c in val_counts) / max(len(val_counts), 1)


def evaluate(cfg: DictConfig, stage: str = "validate") -> dict[str, Any]:
    """Run `validate`, `test` or `predict` with the weights of `ckpt_path` (default: the run's last.ckpt)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    path = run_dir(cfg)
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path else last_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"key 'ckpt_path': no checkpoint given and none in {path / 'checkpoints'}; "
                          f"train first (`crowdseg fit`) or pass ckpt_path=...")
    check_checkpoint(ckpt)
    prepare_run_dir(cfg, write_config=False)
    job = build_job(cfg, path)
    trainer = build_trainer(cfg, path, job)
    run = {"validate": trainer.validate, "test": trainer.test, "predict": trainer.predict}[stage]
    result = run(job.module, datamodule=job.datamodule, ckpt_path=str(ckpt))
    if stage == "predict":
        return {"predictions": result, "run_dir": str(path)}
    metrics = _floats(trainer.callback_metrics)
    metrics.update(run_dir=str(path), checkpoint=str(ckpt))
    return metrics


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (torch.Tensor, float, int))}


__all__ = ["train", "evaluate", "METHODS", "Job", "run_dir"]
