"""A `crowdseg fit` that SIGKILLs itself at a known point: the instrument of the kill-and-rerun tests
(tests/test_train.py, test_exact_resume.py, test_xmask_method.py) and of benchmarks/exact_resume.py.

    python tests/kill_child.py {train,validation,checkpoint_write} STEP <experiment.yaml> [key=value ...]

- train: after training step STEP;
- validation: inside the first validation that starts at step >= STEP, after its first batch;
- checkpoint_write: in the first checkpoint write of step >= STEP, when half of the checkpoint is in
  the temporary file and before it would replace its target.

The hooks reach the Trainer the way any caller's do, `crowdseg.train.train(cfg, callbacks=...,
checkpoint_io=...)`: nothing in the package knows about them. Run as a script (not `-m`), so
Lightning's DDP launcher, which re-executes `sys.argv` for the other ranks, kills every rank alike.
"""
from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from crowdseg.runs import AtomicCheckpointIO  # noqa: E402

KILL_POINTS = ("train", "validation", "checkpoint_write")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Callback):
    """SIGKILL this process once `step` training steps are done (or, with `phase` "validation", in
    the first validation from step `step` on, after its first batch)."""

    def __init__(self, step: int, phase: str = "train"):
        self.step, self.phase = step, phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "train" and trainer.global_step >= self.step:
            _kill()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "validation" and not trainer.sanity_checking and trainer.global_step >= self.step:
            _kill()


class KillInCheckpointWrite(AtomicCheckpointIO):
    """The first checkpoint of step >= `step` is half written into its temporary file, then the
    process is SIGKILLed before the temporary file would replace the target."""

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


def kill_hooks(point: str, step: int) -> dict[str, Any]:
    """`train()`'s keyword arguments that kill the run at `point` (one of KILL_POINTS) from `step` on."""
    if point not in KILL_POINTS:
        raise ValueError(f"kill point {point!r}: expected one of {', '.join(KILL_POINTS)}")
    if point == "checkpoint_write":
        return {"checkpoint_io": KillInCheckpointWrite(step)}
    return {"callbacks": [KillAtStep(step, point)]}


def command(point: str, step: int, experiment: Any, *overrides: str) -> list[str]:
    """The child's command line (run it with cwd at the repository root)."""
    return [sys.executable, os.path.abspath(__file__), point, str(step), str(experiment), *overrides]


def main(argv: list[str]) -> None:
    from crowdseg.config import load_config
    from crowdseg.train import train

    point, step, experiment, *overrides = argv
    train(load_config(experiment, overrides), **kill_hooks(point, int(step)))


if __name__ == "__main__":
    main(sys.argv[1:])
