"""Exact continuation: a run killed at any point and rerun continues as if it had never stopped.

What a resumed run needs beyond Lightning's weights / optimizer / scheduler / loop counters:

- the data order, position and augmentations: `datamodules.resumable` (torchdata's
  `StatefulDataLoader` and a stateful sampler, whose state Lightning keeps in the checkpoint; each
  sample's augmentation drawn from (seed, epoch, index));
- the global random state (python `random`, numpy, torch CPU and CUDA) that a training step may draw
  from: `StepSeed` sets it before every training batch from (seed, rank, epoch, batch index) and
  before every validation from (seed, rank, step). The state is then a function of where the run
  is, not of its history: nothing has to be saved per rank (Lightning would keep callback state from
  rank 0 only), and the draws between a checkpoint and the next step (validation, a new epoch's
  loader, the checkpoint itself) cannot make a resumed run differ from an uninterrupted one.

The kill tests stop a child at a known point with hooks of their own (tests/kill_child.py), handed to
`crowdseg.train.train(cfg, callbacks=..., checkpoint_io=...)` like any caller's.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def seed_globals(*key: int) -> None:
    """Seed python `random`, numpy's global generator and torch (CPU, every CUDA device) from `key`."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    seed = int(state[0]) << 32 | int(state[1])
    random.seed(seed)
    np.random.seed(int(state[0]))
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily when CUDA is not initialised)


class StepSeed(Callback):
    """Global random state as a function of the run's position (see the module docstring)."""

    TRAIN, VAL = 0, 1

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        seed_globals(self.seed, self.TRAIN, trainer.global_rank, trainer.current_epoch, batch_idx)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        seed_globals(self.seed, self.VAL, trainer.global_rank, trainer.global_step)

