"""Training loaders that a killed run continues exactly.

A run killed at any point and resumed from its `last.ckpt` must see the same batches, with the same
augmentations, as a run that was never stopped. Two things make that so:

- **Order and position.** The training sampler (`EpochKeyedSampler`) draws the epoch's order from
  (seed, epoch) alone, shards it by rank like `DistributedSampler` (it is one, so Lightning leaves it
  in place under DDP) and is stateful like torchdata's `StatefulDistributedSampler`: its position
  within the epoch (and the epoch itself) is part of the state of torchdata's `StatefulDataLoader`,
  which Lightning stores in every checkpoint and restores on resume (fit loop state,
  `combined_loader`). The position is the same on every rank, so rank 0's checkpoint serves all.
- **Augmentations.** Each index is yielded as a key `(index, epoch)`; `KeyedSamples` opens a
  `sample_key` context while the wrapped dataset loads that sample, and a seeded transform
  (`datamodules.transforms.TrainTransform` and friends) then draws from a generator seeded by
  (its seed, epoch, index) instead of its per-worker stream. So a sample's crop, flip and jitter do
  not depend on the number of workers, on prefetching, or on where a run was resumed.
"""
from __future__ import annotations

import contextvars
import itertools
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.distributed import CycleDistributedSampler


class SampleKey:
    """The (epoch, index) of the sample being loaded, and which of a run's training streams it is
    from (e.g. 0 labeled, 1 unlabeled: two datasets' sample 0 are not augmented alike); a new object
    for every load, so a transform restarts its generator even when a sample is loaded twice in a row."""

    __slots__ = ("epoch", "index", "stream")

    def __init__(self, epoch: int, index: int, stream: int = 0):
        self.epoch, self.index, self.stream = int(epoch), int(index), int(stream)

    def entropy(self) -> list[int]:
        return [self.stream, self.epoch, self.index]

    def __repr__(self) -> str:
        return f"SampleKey(epoch={self.epoch}, index={self.index}, stream={self.stream})"


_CURRENT: contextvars.ContextVar[Optional[SampleKey]] = contextvars.ContextVar("crowdseg_sample_key", default=None)


@contextmanager
def sample_key(epoch: int, index: int, stream: int = 0) -> Iterator[SampleKey]:
    """Within this context, seeded transforms draw from (their seed, stream, epoch, index)."""
    key = SampleKey(epoch, index, stream)
    token = _CURRENT.set(key)
    try:
        yield key
    finally:
        _CURRENT.reset(token)


def current_sample_key() -> Optional[SampleKey]:
    return _CURRENT.get()


class KeyedSamples(Dataset):
    """`dataset[index]` for a key `(index, epoch)` (from `EpochKeyedSampler`), inside `sample_key`;
    a plain int index (e.g. a sampler Lightning substituted) loads without a key."""

    def __init__(self, dataset: Dataset, stream: int = 0):
        self.dataset, self.stream = dataset, stream

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, epoch = key
            with sample_key(epoch, index, self.stream):
                return self.dataset[index]
        return self.dataset[key]


class KeyedStateMixin:
    """For a `DistributedSampler` subclass whose order is a function of (seed, epoch, rank): yields
    `(index, epoch)` keys, and its `state_dict` (how many indices of the epoch were drawn, and the
    epoch) lets a new sampler continue the epoch where this one stopped. The counting is torchdata's
    `StatefulDistributedSampler`'s; the epoch is restored too, because a `StatefulDataLoader` with
    workers draws indices as soon as its iterator exists, before Lightning calls `set_epoch`."""

    epoch: int
    yielded: int = 0
    next_yielded: Optional[int] = None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.next_yielded or 0
        self.yielded, self.next_yielded = skip, None
        for index in itertools.islice(super().__iter__(), skip, None):  # type: ignore[misc]
            self.yielded += 1
            yield index, epoch

    def state_dict(self) -> dict[str, Any]:
        return {"yielded": self.yielded, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("yielded", -1) < 0:
            raise ValueError(f"not a sampler state: {state_dict}")
        yielded, epoch = int(state_dict["yielded"]), int(state_dict.get("epoch", self.epoch))
        if yielded >= len(self):  # saved at the end of an epoch: what follows is the next epoch, from its start
            yielded, epoch = 0, epoch + 1
        self.next_yielded, self.epoch = yielded, epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # another epoch starts at its beginning, whatever position was restored
            self.next_yielded = None
        super().set_epoch(epoch)  # type: ignore[misc]


class EpochKeyedSampler(KeyedStateMixin, DistributedSampler):
    """`DistributedSampler`'s order (a permutation seeded by seed + epoch, rank r taking every
    `num_replicas`-th index, padded to equal shards), yielded as `(index, epoch)` keys, resumable
    mid-epoch (`KeyedStateMixin`). One process is `num_replicas=1, rank=0`. Being a
    DistributedSampler, Lightning leaves it in place under DDP (and calls `set_epoch`)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)


class KeyedCycleSampler(KeyedStateMixin, CycleDistributedSampler):
    """`datamodules.distributed.CycleDistributedSampler` (a rank's shard cycled to `num_samples`
    indices per epoch: the labeled loader of a semi-supervised epoch), yielded as `(index, epoch)`
    keys and resumable mid-epoch."""


def default_seed() -> int:
    """The seed Lightning's own DistributedSampler uses: `seed_everything`'s (PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def epoch_to_run(trainer: Any) -> int:
    """The epoch the fit loop of `trainer` runs next (0 without a trainer): what Lightning will pass to
    `set_epoch`. A loader with workers draws its first indices as soon as Lightning creates its
    iterator, which on a resumed run happens before `set_epoch`, so the sampler must start there."""
    try:
        return int(trainer.fit_loop.epoch_progress.current.processed)
    except (AttributeError, RuntimeError):
        return 0


def resumable_loader(dataset: Dataset, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                     seed: Optional[int] = None, shuffle: bool = True, drop_last: bool = False,
                     sampler: Optional[DistributedSampler] = None, num_workers: int = 0,
                     collate_fn: Optional[Callable] = None, pin_memory: bool = False,
                     stream: int = 0, epoch: int = 0) -> StatefulDataLoader:
    """A training `StatefulDataLoader` over `dataset` whose order, position and augmentations survive
    a kill (see the module docstring). `sampler` replaces the default `EpochKeyedSampler` (a
    `KeyedStateMixin` sampler, e.g. `KeyedCycleSampler`); `stream` tells the augmentations of a
    run's training loaders apart (`SampleKey`); `epoch` is the sampler's first epoch (`epoch_to_run`)."""
    if sampler is None:
        sampler = EpochKeyedSampler(dataset, num_replicas, rank, shuffle=shuffle,
                                    seed=default_seed() if seed is None else seed)
    sampler.set_epoch(epoch)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(KeyedSamples(dataset, stream), batch_size=batch_size, sampler=sampler,
                                  num_workers=num_workers, collate_fn=collate_fn, persistent_workers=num_workers > 0,
                                  pin_memory=pin_memory, drop_last=drop_last)
