"""Exact continuation (issue 14.3): a run killed with SIGKILL at any point and rerun with the same
command ends with the weights and metrics of an uninterrupted run (CPU, same seed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.resumable import EpochKeyedSampler, KeyedSamples, resumable_loader, sample_key
from datamodules.synthetic import SyntheticCrowd
from datamodules.transforms import TrainTransform, TwoViewTransform
from datamodules.types import collate_samples

from conftest import TINY
from kill_child import command as kill_command

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "p2p" / "synthetic.yaml"


# ----------------------------------------------------------------------------------------------
# units: sampler, keyed augmentations, loader state

def test_sampler_yields_epoch_keys_and_shards_by_rank():
    data = list(range(10))
    ranks = [EpochKeyedSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    keys = [list(s) for s in ranks]
    assert all(epoch == 4 for part in keys for _, epoch in part)
    assert sorted(i for part in keys for i, _ in part) == data  # disjoint shards covering the data
    ranks[0].set_epoch(5)
    assert [i for i, _ in ranks[0]] != [i for i, _ in keys[0]]  # another epoch, another order


def test_sampler_state_restores_position_and_epoch():
    sampler = EpochKeyedSampler(list(range(12)), seed=1)
    sampler.set_epoch(2)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    rest = list(it)
    fresh = EpochKeyedSampler(list(range(12)), seed=1)  # epoch 0 until the state says otherwise
    fresh.load_state_dict(state)
    assert state["epoch"] == 2 and head + list(fresh) == head + rest


@pytest.mark.parametrize("cls", [TrainTransform, TwoViewTransform])
def test_keyed_augmentation_is_a_function_of_seed_epoch_index(cls):
    ds = SyntheticCrowd(3, "train")
    t = cls(48, seed=7)
    with sample_key(1, 2):
        first = t(ds[2])
    for i in range(3):  # other draws in between (another sample, the per-process stream) change nothing
        with sample_key(0, i):
            t(ds[i])
        t(ds[i])
    with sample_key(1, 2):
        again = t(ds[2])
    with sample_key(2, 2):
        next_epoch = t(ds[2])
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["points"], again["points"])
    assert not torch.equal(first["image"], next_epoch["image"])
    other_seed = cls(48, seed=8)
    with sample_key(1, 2):
        assert not torch.equal(other_seed(ds[2])["image"], first["image"])


def _synthetic_loader(workers: int):
    """A resumable loader over 12 synthetic images, batches of 3, seed 9."""
    dataset = SyntheticCrowd(12, "train", transform=TrainTransform(32, seed=5))
    return resumable_loader(dataset, 3, seed=9, num_workers=workers, collate_fn=collate_samples)


def _epoch_images(workers: int, epoch: int) -> list[torch.Tensor]:
    """The batches' images of a whole `epoch` of a fresh `_synthetic_loader`."""
    loader = _synthetic_loader(workers)
    loader.sampler.set_epoch(epoch)
    return _images(loader)


def _images(batches) -> list[torch.Tensor]:
    return [b["image"] for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_mid_epoch_with_the_same_batches(workers):
    """The StatefulDataLoader's state after 2 batches of epoch 1, loaded into a new loader (a new
    process in real life), gives the remaining batches of that epoch, augmentations included; the
    batches do not depend on the number of workers."""
    full = _epoch_images(workers, 1)
    interrupted = _synthetic_loader(workers)
    interrupted.sampler.set_epoch(1)
    it = iter(interrupted)
    head = [next(it) for _ in range(2)]
    state = interrupted.state_dict()
    del it, interrupted
    resumed = _synthetic_loader(workers)
    resumed.load_state_dict(state)
    tail = _images(resumed)
    assert len(tail) == len(full) - 2
    for a, b in zip(_images(head) + tail, full):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(_epoch_images(0, 1), full))


def test_semi_supervised_loaders_resume_mid_epoch():
    from datamodules.semi import SemiSupervisedDataModule

    full = SyntheticCrowd(12, "train")
    labeled = full.subset(full.names[:4], TrainTransform(32, seed=0))
    unlabeled = full.subset(full.names[4:], TwoViewTransform(32, seed=0))

    def loaders():
        dm = SemiSupervisedDataModule(labeled, unlabeled, labeled_batch_size=2, unlabeled_batch_size=2, seed=3)
        found = dm.train_dataloader().flattened
        for loader in found:
            loader.sampler.set_epoch(1)
        return found

    full_run = [_images(loader) for loader in loaders()]
    assert len(full_run[0]) == len(full_run[1]) == 4  # the labeled loader cycles to the unlabeled length
    for which, loader in enumerate(loaders()):
        it = iter(loader)
        head = [next(it)["image"]]
        state = loader.state_dict()
        resumed = loaders()[which]
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(head + _images(resumed), full_run[which], strict=True))


def test_keyed_samples_accepts_plain_indices():
    ds = SyntheticCrowd(2, "train")
    assert torch.equal(KeyedSamples(ds)[1]["image"], ds[1]["image"])


# ----------------------------------------------------------------------------------------------
# end to end: kill -9 a child `crowdseg fit`, rerun the same command, compare with an uninterrupted child

# 16 images / batch 4: 4 steps per epoch, 2 epochs; last.ckpt every 3 steps and at each epoch end;
# validation every epoch. Reference and reruns are child processes alike (same threads, same sums).
# Two loader workers: with workers, Lightning creates a resumed run's iterator (which prefetches) before
# it calls set_epoch, the case `epoch_to_run` exists for (the checkpoint_write kill resumes at an epoch end).
OVERRIDES = TINY + ["data.synthetic.num_train=16", "trainer.max_epochs=2", "checkpoint_every_n_steps=3",
                    "data.num_workers=2"]


def _fit(runs_root: Path, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """A child `crowdseg fit`; with `kill` = (point, step), one that SIGKILLs itself there (tests/kill_child.py)."""
    args = [str(EXPERIMENT), *OVERRIDES, f"runs_root={runs_root}"]
    command = kill_command(*kill, *args) if kill else [sys.executable, "-m", "crowdseg", "fit", *args]
    environ = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


def _run_dir(runs_root: Path) -> Path:
    (path,) = runs_root.glob("p2p/synthetic/*")
    return path


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = _fit(root)
    assert done.returncode == 0, done.stderr[-3000:]
    run = _run_dir(root)
    return _last(run), json.loads((run / "metrics" / "val.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_in,step,resumed_from", [
    ("train", 7, 6),                  # killed after step 7 of 8: last.ckpt is step 6's, mid-epoch 2
    ("validation", 4, 3),             # killed inside the first validation: last.ckpt is step 3's (mid-epoch 1)
    ("checkpoint_write", 6, 4),       # killed writing step 6's checkpoint: step 4's last.ckpt survives
])
def test_kill_and_rerun_equals_uninterrupted_run(tmp_path, uninterrupted, kill_in, step, resumed_from):
    reference, reference_metrics = uninterrupted
    killed = _fit(tmp_path, kill=(kill_in, step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = _run_dir(tmp_path)
    assert int(_last(run)["global_step"]) == resumed_from
    partial = list((run / "checkpoints").glob(".*.tmp*"))
    assert bool(partial) == (kill_in == "checkpoint_write")
    wandb_id = (run / "wandb_id").read_text()

    done = _fit(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _last(run)
    assert final["global_step"] == reference["global_step"] == 8
    # exactly equal: the same batches, augmentations and random draws in the same order
    assert _max_abs_diff(final["state_dict"], reference["state_dict"]) == 0.0
    for key in ("optimizer_states", "lr_schedulers"):
        assert repr(final[key]) == repr(reference[key]), key
    metrics = json.loads((run / "metrics" / "val.json").read_text())["metrics"]
    assert metrics == reference_metrics
    assert not list(run.rglob("*.tmp*")), "the partial checkpoint was not cleaned up"
    assert (run / "wandb_id").read_text() == wandb_id, "the rerun is not the same wandb run"


def test_global_random_state_is_a_function_of_the_position():
    from crowdseg.continuation import seed_globals

    seed_globals(0, 0, 1, 2, 3)
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    torch.rand(5)
    seed_globals(0, 0, 1, 2, 3)
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    seed_globals(0, 0, 1, 2, 4)
    assert not torch.equal(torch.rand(3), a[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_saved_at_an_epoch_end_continues_with_the_next_epoch(workers):
    """A checkpoint written at the end of epoch 1 (iterator exhausted) resumes into epoch 2 with epoch
    2's full order, whether Lightning calls `set_epoch(2)` before or after loading the state."""
    epoch2 = _epoch_images(workers, 2)
    finished = _synthetic_loader(workers)
    finished.sampler.set_epoch(1)
    _images(finished)
    state = finished.state_dict()
    for set_epoch_first in (True, False):
        resumed = _synthetic_loader(workers)
        if set_epoch_first:
            resumed.sampler.set_epoch(2)
        resumed.load_state_dict(state)
        if not set_epoch_first:
            resumed.sampler.set_epoch(2)
        got = _images(resumed)
        assert len(got) == len(epoch2) and all(torch.equal(a, b) for a, b in zip(got, epoch2)), set_epoch_first
