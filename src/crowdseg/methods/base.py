"""What a method module provides: its config sections, load-time checks and `build(cfg, run_dir, split) -> Job`.

A method is one module `crowdseg/methods/<name>.py` ending in `METHOD = Method(...)`; the registry
(`crowdseg.methods.METHODS`) lists them and is the only list of method names. Keep the module's
top-level imports light (dataclasses, omegaconf, `crowdseg.choices` for the allowed values of a key):
models and Lightning modules are imported inside `build`, so loading a config imports neither torch
nor Lightning (tests/test_light_imports.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from omegaconf import DictConfig

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L


@dataclass
class Job:
    """What a method contributes to a run: its LightningModule and its DataModule."""
    module: "L.LightningModule"
    datamodule: "L.LightningDataModule"


def no_checks(cfg: DictConfig) -> None:
    """The default `Method.check`: nothing beyond the schema's types."""


@dataclass(frozen=True)
class Method:
    """One training method.

    sections: config sections the method adds to the shared ones (data, optim, trainer, logger, ...):
              section name -> dataclass schema. A key of another method's section fails at load time.
    build:    (resolved config, run directory, split=None) -> Job; `split` is the run's LabelSplit, planned
              once by crowdseg.train (None: the method's data code plans it, as tests do).
    check:    choice and range checks of the method's keys, run at load time; raise ConfigError
              naming the key.
    summary:  one line for `crowdseg --help`.
    """
    name: str
    sections: dict[str, type]
    build: Callable[..., Job]
    check: Callable[[DictConfig], None] = no_checks
    summary: str = ""
    trains: bool = True  # False for a method that only has its own command (dpmo: `crowdseg masks`)
