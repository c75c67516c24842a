"""Run directories, resume, loggers and checkpoints.

A run lives in `<runs_root>/<experiment>/<run_name>` (deterministic, no timestamps) and holds
`config.yaml`, `checkpoints/last.ckpt`, `csv/metrics.csv`, `metrics/<split>.json`, `pictures/`
and `wandb_id`. `fit` on an existing run directory resumes from `last.ckpt` and continues the
same wandb run.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from omegaconf import DictConfig

from crowdseg.config import to_yaml
from crowdseg.errors import ConfigError
from crowdseg.io import CONFIG_KEY, atomic_path, write_text_atomic
from datamodules.splits import fraction_tag

LAST = "last.ckpt"
BEST = "best.ckpt"


def label_fraction(cfg: DictConfig) -> float:
    """The run's real label fraction (`labels.fraction`, recorded from its data), else the configured one."""
    return cfg.labels.fraction if cfg.labels.fraction is not None else cfg.data.label_fraction


def label_tag(cfg: DictConfig) -> str:
    """"lf10", or "lf11.1" for a list holding 11.1 % of the images (3 significant digits)."""
    return f"lf{fraction_tag(label_fraction(cfg), digits=3)}"


def run_name(cfg: DictConfig) -> str:
    """The configured name, else `<method>-<dataset>-lf<real label %>-s<seed>`."""
    if cfg.run_name:
        return cfg.run_name
    return f"{cfg.method}-{cfg.data.name}-{label_tag(cfg)}-s{cfg.seed}"


def base_run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.runs_root) / cfg.name / run_name(cfg)


# Keys that only extend or observe a run: a stored run whose config differs from the current one
# in these alone is the same run (it resumes). Prefixes end with a dot.
SAME_RUN_KEYS = ("trainer.max_epochs", "trainer.max_steps",                # upward only (see below)
                 "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.devices", "trainer.num_nodes",
                 "trainer.strategy", "trainer.accelerator", "data.num_workers", "data.cache_dir", "logger.",
                 "resume", "ckpt_path", "labels.", "runs_root", "run_name")
EXTEND_ONLY = ("trainer.max_epochs", "trainer.max_steps")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _extends(key: str, old: Any, new: Any) -> bool:
    """A larger budget (-1 / None: unlimited) extends a run; a smaller one does not."""
    unlimited = (-1, None)
    return new in unlimited or (old not in unlimited and new >= old)


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, current value)} of the settings that make `current` another run."""
    old, new = _flatten(stored), _flatten(current)
    diff = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        same_run = key.startswith(tuple(k for k in SAME_RUN_KEYS if k.endswith("."))) or (
            key in SAME_RUN_KEYS and (key not in EXTEND_ONLY or _extends(key, a, b)))
        if a == b or same_run:
            continue
        diff[key] = (a, b)
    return diff


def run_dir(cfg: DictConfig) -> Path:
    """The run directory of `cfg`: `<runs_root>/<experiment>/<run name>`, or, when a run already lives
    there with other settings, `<run name>-<hash of the differing settings>` (so sweeps never resume
    each other's runs). With an explicit `run_name` a mismatch is an error listing the keys."""
    return locate_run(cfg)[0]


def locate_run(cfg: DictConfig) -> tuple[Path, str]:
    """(`run_dir(cfg)`, why it is that directory, in words for the console)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    base = base_run_dir(cfg)
    stored = stored_config(base)
    if stored is None:
        return base, "new run"
    current = OmegaConf.to_container(cfg, resolve=True)
    diff = config_differences(stored, current)
    if not diff:
        return base, "the run of these settings"
    listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(diff.items())[:6])
    listed += f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    if cfg.run_name:
        raise ConfigError(f"key 'run_name': {base} holds a run with other settings: {listed}; "
                          f"choose another run_name, or leave it unset to start a new run automatically")
    digest = hashlib.sha256(json.dumps({k: b for k, (_, b) in diff.items()}, sort_keys=True, default=str).encode())
    return base.with_name(f"{base.name}-{digest.hexdigest()[:6]}"), f"{base.name} holds other settings: {listed}"


def trained_run_dir(cfg: DictConfig) -> Path:
    """The directory of the run `cfg` trained (for validate / test / predict): `run_dir(cfg)` when it
    exists, else the base directory (evaluation settings such as another data.root do not make a
    new run)."""
    try:
        path = run_dir(cfg)
    except ConfigError:
        return base_run_dir(cfg)
    return path if path.exists() else base_run_dir(cfg)


def changed_settings(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """{key: value} of the settings in `cfg` that differ from those of the run in `path` (its `config.yaml`)
    in a way that would make another run: what an evaluation with overrides (`loss.score_threshold=0.67`,
    another `data.root`) records beside its metrics, so a record says what produced it."""
    from omegaconf import OmegaConf

    stored = stored_config(path)
    if stored is None:
        return {}
    return {k: new for k, (_, new) in config_differences(stored, OmegaConf.to_container(cfg, resolve=True)).items()}


def stored_config(path: Path) -> Optional[dict[str, Any]]:
    import yaml

    try:
        return yaml.safe_load((path / "config.yaml").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None  # no run there yet (a blocked path is reported by prepare_run_dir)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path / 'config.yaml'}: unreadable run config ({err}); move the run directory away") from None


def is_global_zero() -> bool:
    """True in the launching process (before DDP starts) and on rank 0 (after)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def prepare_run_dir(cfg: DictConfig, write_config: bool = True, path: Optional[Path] = None,
                    key: str = "runs_root") -> Path:
    """Create the run directory (checking it is writable, else an error naming `key`, the setting that
    placed it) and write `config.yaml` atomically.

    Evaluation commands pass `write_config=False`: the file records what was trained; `crowdseg masks`
    too, whose folder records the settings that shape its masks (`settings.yaml`)."""
    path = path or run_dir(cfg)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError as err:
        raise ConfigError(f"key '{key}': run directory {path} is not writable ({err.strerror})") from None
    if write_config and is_global_zero():
        write_text_atomic(path / "config.yaml", to_yaml(cfg))
    return path


def last_checkpoint(path: Path) -> Optional[Path]:
    ckpt = path / "checkpoints" / LAST
    return ckpt if ckpt.is_file() else None


def best_checkpoint(path: Path) -> Optional[Path]:
    """The val-selected `best.ckpt` of a run directory, if validation has run."""
    ckpt = path / "checkpoints" / BEST
    return ckpt if ckpt.is_file() else None


def check_checkpoint(path: str | Path, resuming: bool = False) -> Path:
    """A readable Lightning checkpoint, or a ConfigError naming the file (and `ckpt_path`, unless it is
    the `last.ckpt` a `fit` resumes from, which the user never named: then the way out)."""
    path = Path(path)
    where = "" if resuming else "key 'ckpt_path': "
    way_out = ("; the run cannot resume from it: delete it to train this run from its start, or rerun with "
               "run_name=<a new name>") if resuming else ""
    if not path.is_file():
        raise ConfigError(f"{where}checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise ConfigError(f"{where}{path} is not a checkpoint ({type(err).__name__}){way_out}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{where}{path} is not a Lightning checkpoint (no 'state_dict'){way_out}")
    return path


def finished_step(ckpt_path: Path, cfg: DictConfig) -> Optional[int]:
    """The global step of `ckpt_path` when it holds the end of `cfg`'s training budget
    (`trainer.max_steps`, else `trainer.max_epochs`), else None. Reads Lightning's checkpoint format:
    `global_step` and `loops.fit_loop.epoch_progress.current.processed` (epochs whose batches all ran)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    step = int(ckpt.get("global_step", 0))
    epochs = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    max_steps, max_epochs = cfg.trainer.max_steps, cfg.trainer.max_epochs
    steps_done = max_steps is not None and max_steps > 0 and step >= max_steps
    epochs_done = epochs is not None and max_epochs not in (None, -1) and epochs >= max_epochs
    return step if steps_done or epochs_done else None


def wandb_run_id(path: Path) -> str:
    """The run's wandb id, created once (before training starts) and reused on every resume."""
    id_file = path / "wandb_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if is_global_zero():
        write_text_atomic(id_file, run_id + "\n")
    return run_id


class _AppendingWriter(_ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead.

    Private Lightning API: `_ExperimentWriter`, its `_check_log_dir_exists`, `_fs`, `metrics_file_path`
    and `metrics_keys` (tests/test_lightning_private_api.py fails when they change)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class ResumableCSVLogger(CSVLogger):
    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(cfg: DictConfig, path: Path) -> list[Logger]:
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=str(path), name="", version="csv")]
    wb = cfg.logger.wandb
    if wb.mode != "disabled":
        loggers.append(WandbLogger(
            project=wb.project, entity=wb.entity, id=wandb_run_id(path), name=path.name,
            group=f"{cfg.method}-{label_tag(cfg)}", tags=list(wb.tags) + [cfg.method, cfg.data.name],
            mode=wb.mode, save_dir=str(path), resume="allow", config=_plain(cfg)))
        # Lightning passes wandb.init(anonymous=None), which wandb answers with a deprecation warning on
        # every run; `_wandb_init` is Lightning's private dict of init kwargs (tests/test_first_day.py::test_the_console_is_quiet checks it)
        loggers[-1]._wandb_init.pop("anonymous", None)
    else:
        wandb_run_id(path)
    return loggers


def _plain(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, then rename: a kill never truncates last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class LastCheckpoint(ModelCheckpoint):
    """Writes only `last.ckpt`: every `every_n_train_steps` steps and at the end of every epoch.

    Private Lightning API: `ModelCheckpoint._should_skip_saving_checkpoint`, `_save_last_checkpoint` and
    `_monitor_candidates` (tests/test_lightning_private_api.py fails when their signatures change)."""

    def __init__(self, dirpath: Path, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def build_checkpoint_callbacks(path: Path, every_n_train_steps: int, monitor: str, mode: str) -> list[ModelCheckpoint]:
    """`last.ckpt` every `every_n_train_steps` steps and every epoch (for kill-and-resume), plus
    `best.ckpt` on `monitor`."""
    ckpt_dir = path / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode, save_top_k=1, filename="best",
                           auto_insert_metric_name=False, enable_version_counter=False)
    return [LastCheckpoint(ckpt_dir, every_n_train_steps), best]


def config_from_checkpoint(ckpt: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved config stored in a checkpoint of `crowdseg fit`, with `overrides` applied last
    (e.g. `data.root=...` on another machine) and `ckpt_path` set to the checkpoint."""
    import yaml

    from crowdseg.config.load import _parse_overrides, compose

    path = check_checkpoint(ckpt)
    stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get(CONFIG_KEY)
    if stored is None:
        raise ConfigError(f"key 'ckpt_path': {path} holds no crowdseg config (written by an older version?); "
                          f"pass the experiment file too: crowdseg <command> <experiment.yaml> ckpt_path={path}")
    layers = [(f"{path} (stored config)", yaml.safe_load(stored)),
              ("command-line override", _parse_overrides([*overrides, f"ckpt_path={path}"]))]
    return compose(layers)


def run_dir_of_checkpoint(ckpt: str | Path) -> Path:
    """`<run_dir>/checkpoints/x.ckpt` -> `<run_dir>`; a checkpoint elsewhere -> its folder."""
    path = Path(ckpt).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent
