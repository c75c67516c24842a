"""`train(cfg)` and `evaluate(cfg, stage)`: the pure entry points the CLI and the tests both call."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from crowdseg.config import to_yaml
from crowdseg.console import model_line, progress_bar, quiet_lightning
from crowdseg.continuation import StepSeed
from crowdseg.errors import ConfigError
from crowdseg.io import remove_stale_temporaries
from crowdseg.methods import METHODS, Job, Method
from crowdseg.metrics import write_metrics_json
from crowdseg.runs import (CONFIG_KEY, AtomicCheckpointIO, best_checkpoint, build_checkpoint_callbacks, build_loggers,
                           changed_settings, check_checkpoint, last_checkpoint, locate_run, prepare_run_dir, run_dir,
                           trained_run_dir)



def trainable(cfg: DictConfig) -> Method:
    method = METHODS[cfg.method]
    if not method.trains:
        raise ConfigError(f"key 'method': {cfg.method!r} trains nothing; "
                          + ("run `crowdseg masks <experiment>`" if cfg.method == "dpmo" else "see its docs"))
    return method


def build_job(cfg: DictConfig, path: Path, split: Any = None) -> Job:
    """The method's module and data for `cfg`; `split` is the run's planned label split (planned by the
    method's data code when not given, e.g. in tests)."""
    return trainable(cfg).build(cfg, path, split)


class StoreConfig(Callback):
    """Puts the run's resolved config into every checkpoint, so a checkpoint alone describes its run."""

    def __init__(self, cfg: DictConfig):
        self.yaml = to_yaml(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.yaml


def build_trainer(cfg: DictConfig, path: Path, job: Job, callbacks: Sequence[Callback] = (),
                  checkpoint_io: Optional[AtomicCheckpointIO] = None, records: bool = True,
                  **overrides: Any) -> L.Trainer:
    """The Trainer of every command: `cfg.trainer` (+ `overrides`), the run's loggers, checkpoints and
    step seeding, then the caller's `callbacks`; checkpoints written by `checkpoint_io` (atomic by
    default; a subclass, e.g. the kill tests' own, must keep that). `records=False` leaves out what
    keeps a run's records (loggers, checkpoints, step seeding, validation tracking, the EMA), for a job
    whose outputs are its callbacks' files (`crowdseg masks`)."""
    # None means Lightning's own default, except for check_val_every_n_epoch, where it means "count
    # val_check_interval in steps across epochs"
    trainer_kwargs = {k: v for k, v in dict(cfg.trainer).items() if v is not None or k == "check_val_every_n_epoch"}
    trainer_kwargs.setdefault("enable_model_summary", False)  # its table's FLOPs column reads 0 without an example input
    trainer_kwargs["enable_progress_bar"] = progress_bar(trainer_kwargs.get("enable_progress_bar", True))
    trainer_kwargs.update(overrides)
    if records:
        monitor, mode = getattr(job.module, "monitor", ("val/loss", "min"))
        logger = build_loggers(cfg, path)
        run_callbacks = (build_checkpoint_callbacks(path, cfg.checkpoint_every_n_steps, monitor, mode)
                         + [StoreConfig(cfg), StepSeed(cfg.seed),
                            ValidationStep(report=not trainer_kwargs["enable_progress_bar"])]
                         + weight_averaging(cfg))
    else:
        logger, run_callbacks = False, []
        trainer_kwargs.setdefault("enable_checkpointing", False)
    quiet_lightning()
    return L.Trainer(
        default_root_dir=str(path),
        logger=logger,
        callbacks=run_callbacks + list(callbacks),
        plugins=[checkpoint_io or AtomicCheckpointIO()],
        # a module with manual optimisation (rps) clips its gradients by hand; Lightning refuses to
        gradient_clip_val=cfg.optim.grad_clip if job.module.automatic_optimization else None,
        **trainer_kwargs,
    )


def weight_averaging(cfg: DictConfig) -> list[Callback]:
    """`optim.ema_decay`: an EMA of the weights with a warm-up (crowdseg.averaging, on Lightning's
    WeightAveraging). Validation, best.ckpt and the final weights use the average; the live weights
    stay in the checkpoint for resuming."""
    if cfg.optim.ema_decay is None:
        return []
    from crowdseg.averaging import WarmupEMA

    return [WarmupEMA(cfg.optim.ema_decay)]


def plan_run(cfg: DictConfig) -> tuple[DictConfig, Any]:
    """(cfg with its `labels` record, the label split) for a method whose data follows `crowdseg.data`."""
    from crowdseg.data import plan_split, with_label_record

    split = plan_split(cfg)
    return with_label_record(cfg, split, len(split.val) if split.val is not None else None), split


def record_used_images(cfg: DictConfig, split: Any, job: Job) -> tuple[DictConfig, Any]:
    """(cfg, split) narrowed to the images the built datasets hold (an image `data.on_bad_annotation=skip`
    left out is in no count or list), with the val count of a separate val split too. The run's
    directory keeps the name of the planned split."""
    from crowdseg.data import with_label_record

    used = split.used_by(job.datamodule)
    val = job.datamodule.datasets.get("val")
    val_images = len(used.val) if used.val is not None else (len(val) if hasattr(val, "__len__") else None)
    return with_label_record(cfg, used, val_images), used


def train(cfg: DictConfig, callbacks: Sequence[Callback] = (),
          checkpoint_io: Optional[AtomicCheckpointIO] = None) -> dict[str, Any]:
    """Fit the configured method; resume from `<run_dir>/checkpoints/last.ckpt` when it exists.
    `callbacks` and `checkpoint_io` go to the Trainer (`build_trainer`).

    The labeled / unlabeled / val images are decided first and recorded in `cfg.labels` (and so in
    `config.yaml`, the checkpoints, the metrics JSON and the wandb config), then the run directory is
    written. A run whose `last.ckpt` already holds its whole budget is complete: it is reported and
    nothing is written. Returns the final logged metrics (floats) plus `run_dir` and `checkpoint`.
    """
    from crowdseg.data import write_split_files
    from crowdseg.runs import is_global_zero

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainable(cfg)
    cfg, split = plan_run(cfg)
    path, why = locate_run(cfg)
    resume_from = last_checkpoint(path) if cfg.resume else None
    if resume_from is not None:
        check_checkpoint(resume_from, resuming=True)
        complete = completed_run(path, resume_from, cfg)
        if complete is not None:
            return complete
    job = build_job(cfg, path, split)
    cfg, split = record_used_images(cfg, split, job)
    prepare_run_dir(cfg, path=path)
    if is_global_zero():
        remove_stale_temporaries(path / "checkpoints")  # of a checkpoint write a kill interrupted
        written = write_split_files(path, split)
        resuming = f"resuming from step {_step_of(resume_from)}" if resume_from is not None else why
        print(f"[crowdseg] run: {path} ({resuming})", flush=True)
        if split.source.startswith(tuple("0123456789")) or split.val is not None:
            print(f"[crowdseg] labeled: {cfg.labels.labeled_images} images ({split.source}), unlabeled: "
                  f"{cfg.labels.unlabeled_images}, val: {cfg.labels.val_images}; lists in {written[0].parent}", flush=True)
    trainer = build_trainer(cfg, path, job, callbacks, checkpoint_io)
    if trainer.is_global_zero:
        print(model_line(job.module), flush=True)
    trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=str(resume_from) if resume_from else None)
    if _validated_before_the_end(trainer, job):  # the printed / recorded val metrics are the final weights'
        trainer.validate(job.module, datamodule=job.datamodule, verbose=False)
    metrics = _floats(trainer.callback_metrics)
    if "val/mae" in metrics:
        metrics["val/mae_mean_baseline"] = mean_count_baseline(job.datamodule)
    if trainer.is_global_zero:
        final = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if final:
            write_metrics_json(path, "val", {"split": "val", "step": trainer.global_step, "images": cfg.labels.val_images,
                                             "checkpoint": "end of training (last.ckpt)", "labels": _plain(cfg.labels),
                                             "metrics": final})
    return {**metrics, **_run_paths(path), "global_step": trainer.global_step}


def _run_paths(path: Path) -> dict[str, str]:
    return {"run_dir": str(path), "checkpoint": str(last_checkpoint(path) or ""), "pictures": str(path / "pictures"),
            "metrics_csv": str(path / "csv" / "metrics.csv")}


def _step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))


def completed_run(path: Path, last: Path, cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The recorded result of a run that already ran its whole budget and its final validation (its
    `metrics/val.json` is of `last.ckpt`'s step), else None (the run continues)."""
    from crowdseg.runs import finished_step, is_global_zero

    step = finished_step(last, cfg)
    record = _read_json(path / "metrics" / "val.json") if step is not None else None
    if record is None or record.get("step") != step:  # killed before its final validation: it continues
        return None
    if is_global_zero():
        print(f"[crowdseg] run: {path} is complete (step {step}; trainer.max_epochs={cfg.trainer.max_epochs}, "
              f"max_steps={cfg.trainer.max_steps}); nothing was changed. Raise trainer.max_epochs or "
              f"trainer.max_steps to extend it.", flush=True)
    return {**record.get("metrics", {}), **_run_paths(path), "global_step": step}


def _validated_before_the_end(trainer: L.Trainer, job: Job) -> bool:
    """True when the run has a val split and its last validation ran on earlier weights than the final ones
    (`check_val_every_n_epoch` / `val_check_interval` not dividing the budget)."""
    has_val = getattr(job.datamodule, "datasets", {}).get("val") is not None
    if trainer.limit_val_batches == 0 or not has_val or trainer.interrupted:
        return False
    tracker = next((c for c in trainer.callbacks if isinstance(c, ValidationStep)), None)
    return tracker is not None and tracker.step != trainer.global_step


class ValidationStep(Callback):
    """Remembers the global step of the last (non-sanity) validation; with `report` (no progress bar,
    e.g. output to a log file) prints one line of its main metrics."""

    REPORTED = ("val/mae", "val/rmse", "val/sigma_l_f1", "val/iou_c", "val/mask_ap", "val/mask_ap50")

    def __init__(self, report: bool = False):
        self.step: Optional[int] = None
        self.report = report

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.step = trainer.global_step
        if self.report and trainer.is_global_zero:
            logged = _floats(trainer.callback_metrics)
            shown = ", ".join(f"{k} {logged[k]:.4g}" for k in self.REPORTED if k in logged)
            print(f"[crowdseg] validation at step {trainer.global_step} (epoch {trainer.current_epoch}): "
                  f"{shown or 'done'}", flush=True)


def point_counts(dataset) -> list[int]:
    """Ground-truth count of every whole image of `dataset` (its own `point_counts()` when it has one)."""
    if hasattr(dataset, "point_counts"):
        return list(dataset.point_counts())
    return [len(dataset[i]["points"]) for i in range(len(dataset))]


def mean_count_baseline(datamodule: L.LightningDataModule) -> float:
    """Validation MAE of always predicting the mean count of the (labeled) training images, whole
    images: the bar a counter must beat."""
    train_counts = point_counts(datamodule.datasets["train"])
    mean = sum(train_counts) / max(len(train_counts), 1)
    val_counts = point_counts(datamodule.datasets["val"])
    return sum(abs(c - mean) for c in val_counts) / max(len(val_counts), 1)


def default_checkpoint(path: Path) -> Optional[Path]:
    """The run's val-selected best.ckpt, else its last.ckpt."""
    return best_checkpoint(path) or last_checkpoint(path)


def evaluate(cfg: DictConfig, stage: str = "validate", run_path: Optional[Path] = None,
             images: Optional[str] = None, out: Optional[str] = None) -> dict[str, Any]:
    """Run `validate`, `test` or `predict` with the weights of `ckpt_path` (default: the run's
    val-selected best.ckpt, else last.ckpt). `run_path` overrides the run directory (a checkpoint
    given without its experiment). `predict` writes per-image files (crowdseg.predict) for the
    images of the folder `images` (default: the test split) into `out` (default:
    `<run_dir>/predictions/<folder or split>`)."""
    from crowdseg.predict import PredictionWriter, folder_dataset

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainable(cfg)
    cfg, label_split = plan_run(cfg)
    path = run_path or trained_run_dir(cfg)
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path else default_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"key 'ckpt_path': no checkpoint given and none in {path / 'checkpoints'}; "
                          f"train first (`crowdseg fit`) or pass ckpt_path=...")
    check_checkpoint(ckpt)
    prepare_run_dir(cfg, write_config=False, path=path)
    job = build_job(cfg, path, label_split)
    cfg, _ = record_used_images(cfg, label_split, job)
    split = {"validate": "val", "test": "test", "predict": "predict"}[stage]
    callbacks = []
    if stage == "predict":
        if images is not None:
            job.datamodule.datasets["predict"] = folder_dataset(cfg, images)
        out_dir = Path(out) if out else path / "predictions" / (Path(images).name if images else cfg.data.test_split)
        callbacks.append(PredictionWriter(out_dir))
    # records=False: no logger (an evaluation at Lightning's step 0 in csv/metrics.csv or on wandb would read
    # as a training-time validation), no EMA callback (a checkpoint's weights are already the averaged ones)
    trainer = build_trainer(cfg, path, job, callbacks, records=False)
    previous = _read_json(path / "metrics" / f"{split}.json")
    dataset = job.datamodule.dataset(split)
    step = _step_of(ckpt)
    if trainer.is_global_zero:
        print(f"[crowdseg] {stage}: {len(dataset)} images ({images or split}) with {ckpt} (step {step})", flush=True)
    run = {"validate": trainer.validate, "test": trainer.test, "predict": trainer.predict}[stage]
    run(job.module, datamodule=job.datamodule, ckpt_path=str(ckpt), **({"return_predictions": False} if stage == "predict" else {}))
    if stage == "predict":
        return {"predictions": str(out_dir), "images": len(dataset), "run_dir": str(path), "checkpoint": str(ckpt)}
    metrics = _floats(trainer.callback_metrics)
    if stage == "validate" and "val/mae" in metrics:  # as in fit's record: the bar beside the result
        metrics["val/mae_mean_baseline"] = mean_count_baseline(job.datamodule)
    if trainer.is_global_zero:
        record = {"split": split, "images": len(dataset), "checkpoint": str(ckpt), "step": step,
                  "labels": _plain(cfg.labels), "metrics": {k: v for k, v in metrics.items() if k.startswith(f"{split}/")}}
        changed = changed_settings(path, cfg)
        if changed:
            record["settings"] = changed
        if previous and previous.get("checkpoint") not in (None, str(ckpt)):
            record["previous"] = {k: v for k, v in previous.items() if k != "previous"}
            print(f"[crowdseg] metrics/{split}.json: the earlier result ({previous.get('checkpoint')}) is kept "
                  f"under 'previous'", flush=True)
        write_metrics_json(path, split, record)
    metrics.update(run_dir=str(path), checkpoint=str(ckpt))
    return metrics


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _plain(section: Any) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(section, resolve=True)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (torch.Tensor, float, int))}


__all__ = ["train", "evaluate", "build_job", "build_trainer", "Job", "run_dir", "CONFIG_KEY"]
