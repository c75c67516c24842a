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

Test hooks (environment variables), so kill tests stop a child at a known point:
`CROWDSEG_KILL_AT_STEP=N` SIGKILLs the process after training step N (`CROWDSEG_KILL_IN=train`,
the default); with `CROWDSEG_KILL_IN=validation` inside the first validation that starts at step
>= N (after its first batch); with `CROWDSEG_KILL_IN=checkpoint_write` in the first checkpoint
write at step >= N, when half of the checkpoint is in the temporary file and before it replaces
`last.ckpt`.
"""
from __future__ import annotations

import io
import os
import random
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from crowdseg.runs import AtomicCheckpointIO

KILL_POINTS = ("train", "validation", "checkpoint_write")


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


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Callback):
    """Test hook: SIGKILL this process once `step` training steps are done (or, with `phase`
    "validation", in the first validation from step `step` on, after its first batch)."""

    def __init__(self, step: int, phase: str = "train"):
        self.step, self.phase = step, phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "train" and trainer.global_step >= self.step:
            _kill()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "validation" and not trainer.sanity_checking and trainer.global_step >= self.step:
            _kill()


class KillInCheckpointWrite(AtomicCheckpointIO):
    """Test hook: the first checkpoint of step >= `step` is half written into its temporary file,
    then the process is SIGKILLed before the temporary file would replace the target."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if int(checkpoint.get("global_step", -1)) < self.step:
            return super().save_checkpoint(checkpoint, path, storage_options)
        from crowdseg.io import atomic_path

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _kill()


def kill_hooks() -> tuple[list[Callback], Optional[AtomicCheckpointIO]]:
    """(callbacks, checkpoint IO) of the kill test hooks the environment asks for."""
    step = os.environ.get("CROWDSEG_KILL_AT_STEP")
    phase = os.environ.get("CROWDSEG_KILL_IN", "train")
    if not step:
        return [], None
    if phase not in KILL_POINTS:
        raise ValueError(f"CROWDSEG_KILL_IN={phase!r}: expected one of {', '.join(KILL_POINTS)}")
    if phase == "checkpoint_write":
        return [], KillInCheckpointWrite(int(step))
    return [KillAtStep(int(step), phase)], None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary checkpoint files a kill during a write left in `<run_dir>/checkpoints`
    (never read: the write they belonged to did not replace its target)."""
    removed = []
    for tmp in sorted((run_dir / "checkpoints").glob(".*.tmp*")):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed
