"""Shared fixtures. Tests run on CPU with small, randomly initialised models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Overrides that make any experiment tiny: a few small synthetic images, one epoch, no workers.
TINY = [
    "model.backbone=resnet10t", "model.fpn_channels=32", "model.head_channels=32",
    "data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.num_test=2",
    "data.synthetic.height=64", "data.synthetic.width=64", "data.synthetic.max_people=20",
    "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu", "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1",
    "logger.num_pictures=1",
    # the demo's budget is in steps (a cosine over 288): the tiny runs count epochs, with a step schedule
    "trainer.max_steps=-1", "trainer.val_check_interval=null", "optim.schedule=step",
]


@pytest.fixture
def tiny_overrides(tmp_path: Path, request) -> list[str]:
    overrides = TINY + [f"runs_root={tmp_path / 'runs'}"]
    if "density" in request.module.__name__:  # the density counter's `model` is only its backbone
        overrides = [o for o in overrides if not o.startswith(("model.fpn_channels", "model.head_channels"))]
    return overrides


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"the shared test data is missing: {SHARED_DATA}")
    return SHARED_DATA
