"""Training loaders that a killed run continues exactly.

A run killed at any point and resumed from its `last.ckpt` must see the same batches, with the same
augmentations, as a run that was never stopped. Two things make that so:

- **Order and position.** The training sampler (`EpochKeyedSampler`) draws the epoch's order from
  (seed, epoch) alone, shards it by rank like `DistributedSampler` (it is one, so Lightning leaves it
  in place under DDP), and is torchdata's `StatefulDistributedSampler`: its position within the epoch
  (and the epoch itself) is part of the state of the `StatefulDataLoader`, which Lightning stores
  in every checkpoint and restores on resume (fit loop state, `combined_loader`).
- **Augmentations.** Each index is yielded as a key `(index, epoch)`; `KeyedSamples` opens a
  `sample_key` context while the wrapped dataset loads that sample, and a seeded transform
  (`datamodules.transforms.TrainTransform` and friends) then draws from a generator seeded by
  (its seed, epoch, index) instead of its per-worker stream. So a sample's crop, flip and jitter do
  not depend on the number of workers, on prefetching, or on where a run was resumed.
"""
from __future__ import annotations

import contextvars
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


class SampleKey:
    """The (epoch, index) of the sample being loaded; a new object for every load, so a transform
    restarts its generator even when the same sample is loaded twice in a row."""

    __slots__ = ("epoch", "index")

    def __init__(self, epoch: int, index: int):
        self.epoch, self.index = int(epoch), int(index)

    def entropy(self) -> list[int]:
        return [self.epoch, self.index]

    def __repr__(self) -> str:
        return f"SampleKey(epoch={self.epoch}, index={self.index})"


_CURRENT: contextvars.ContextVar[Optional[SampleKey]] = contextvars.ContextVar("crowdseg_sample_key", default=None)


@contextmanager
def sample_key(epoch: int, index: int) -> Iterator[SampleKey]:
    """Within this context, seeded transforms draw from (their seed, epoch, index)."""
    key = SampleKey(epoch, index)
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

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, epoch = key
            with sample_key(epoch, index):
                return self.dataset[index]
        return self.dataset[key]


class EpochKeyedSampler(StatefulDistributedSampler):
    """`DistributedSampler`'s order (a permutation seeded by seed + epoch, rank r taking every
    `num_replicas`-th index, padded to equal shards), yielded as `(index, epoch)` keys.

    Its state (`state_dict`) is how far into the epoch it is and the epoch; torchdata's
    `StatefulDataLoader` saves it with each checkpoint and restores it, so a resumed epoch continues
    where the killed one stopped. One process is `num_replicas=1, rank=0`.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for index in super().__iter__():
            yield index, epoch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # the loader's iterator can be created (and its workers primed) before Lightning sets the epoch
        self.epoch = int(state_dict.get("epoch", self.epoch))


def default_seed() -> int:
    """The seed Lightning's own DistributedSampler uses: `seed_everything`'s (PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def resumable_loader(dataset: Dataset, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                     seed: Optional[int] = None, shuffle: bool = True, drop_last: bool = False,
                     sampler: Optional[StatefulDistributedSampler] = None, num_workers: int = 0,
                     collate_fn: Optional[Callable] = None, pin_memory: bool = False) -> StatefulDataLoader:
    """A training `StatefulDataLoader` over `dataset` whose order, position and augmentations survive
    a kill (see the module docstring). `sampler` replaces the default `EpochKeyedSampler` (it must
    yield `(index, epoch)` keys too)."""
    if sampler is None:
        sampler = EpochKeyedSampler(dataset, num_replicas, rank, shuffle=shuffle,
                                    seed=default_seed() if seed is None else seed)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(KeyedSamples(dataset), batch_size=batch_size, sampler=sampler,
                                  num_workers=num_workers, collate_fn=collate_fn, persistent_workers=num_workers > 0,
                                  pin_memory=pin_memory, drop_last=drop_last)
