"""Batch sizes under DDP and a cycling sampler that keeps each rank on its own shard."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from crowdseg.errors import ConfigError


def world_and_rank(trainer=None) -> tuple[int, int]:
    """(world size, global rank) from a Lightning trainer, else torch.distributed, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def per_rank_batch_size(global_batch_size: int, world_size: int, key: str = "data.batch_size") -> int:
    """`global_batch_size // world_size`; a ConfigError naming `key` when it does not divide."""
    if global_batch_size < 1:
        raise ConfigError(f"key '{key}': the batch size must be at least 1, got {global_batch_size}")
    if global_batch_size % world_size:
        raise ConfigError(f"key '{key}': global batch size {global_batch_size} is not divisible by the world size "
                          f"{world_size} (devices x nodes); use a multiple of {world_size}")
    return global_batch_size // world_size


class CycleDistributedSampler(DistributedSampler):
    """Yields `num_samples` indices per epoch from this rank's shard, cycling through it.

    Each epoch the dataset is permuted (seed + epoch, the same on every rank) and rank r takes
    every `num_replicas`-th index from position r, so ranks hold disjoint shards; the shard is
    repeated (reshuffled each round) until `num_samples` indices are drawn. Lightning leaves a
    DistributedSampler in place, so this is how the labeled loader of a semi-supervised epoch
    cycles while the unlabeled loader is sharded by Lightning's own sampler.
    """

    def __init__(self, dataset: Dataset, num_samples: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, 0, False
        self.num_samples = int(num_samples)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if n == 0 or self.num_samples == 0:
            return iter([])
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        shard = order[self.rank::self.num_replicas]
        if len(shard) == 0:  # fewer images than ranks: sharing is unavoidable
            shard = order[self.rank % n:self.rank % n + 1]
        rounds = math.ceil(self.num_samples / len(shard))
        parts = [shard] + [shard[torch.randperm(len(shard), generator=g)] if self.shuffle else shard
                           for _ in range(rounds - 1)]
        return iter(torch.cat(parts)[:self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples
