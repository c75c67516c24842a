"""`SemiSupervisedDataModule`: labeled and unlabeled loaders combined for teacher-student training.

One training epoch is one pass over the unlabeled set; the labeled set cycles alongside it (a
`CycleDistributedSampler` draws exactly as many labeled batches as there are unlabeled ones).
Batches are `{"labeled": batch, "unlabeled": batch}` from Lightning's `CombinedLoader`; an
unlabeled batch holds the weak view in `image`, the strong view in `image_strong` and the erased
rectangles in `cutout` (datamodules/transforms.py, `TwoViewTransform`).

Batch sizes are global and divided by the world size. Both training loaders are resumable
(datamodules/resumable.py: order, position and augmentations survive a kill) and shard by rank
themselves (Lightning injects its DistributedSampler into the val / test loaders), so every rank
sees a disjoint part of both sets.
"""
from __future__ import annotations

import math
from typing import Optional

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import Dataset

from crowdseg.errors import DataError
from datamodules.crowd import CrowdDataModule
from datamodules.distributed import per_rank_batch_size, world_and_rank
from datamodules.resumable import KeyedCycleSampler, epoch_to_run, resumable_loader
from datamodules.transforms import collate_two_views
from datamodules.types import collate_samples


def dataset_names(dataset: Dataset) -> list[str] | None:
    names = getattr(dataset, "names", None)
    return list(names) if names is not None else None


class SemiSupervisedDataModule(CrowdDataModule):
    """labeled / unlabeled training sets (+ val / test), separate global batch sizes."""

    def __init__(self, labeled: Dataset, unlabeled: Dataset, val: Optional[Dataset] = None,
                 test: Optional[Dataset] = None, predict: Optional[Dataset] = None, labeled_batch_size: int = 4,
                 unlabeled_batch_size: int = 4, eval_batch_size: int = 1, num_workers: int = 0, seed: int = 0):
        super().__init__(train=labeled, val=val, test=test, predict=predict, batch_size=labeled_batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers)
        if len(labeled) == 0:
            raise DataError("the labeled training set is empty")
        if len(unlabeled) == 0:
            raise DataError("the unlabeled training set is empty (label fraction 100 % needs the fully supervised CrowdDataModule)")
        lab, unl = dataset_names(labeled), dataset_names(unlabeled)
        if lab is not None and unl is not None and set(lab) & set(unl):
            shared = sorted(set(lab) & set(unl))
            raise DataError(f"{len(shared)} image(s) are both labeled and unlabeled, e.g. {shared[0]}")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.labeled_batch_size, self.unlabeled_batch_size, self.seed = labeled_batch_size, unlabeled_batch_size, seed

    def train_dataloader(self) -> CombinedLoader:
        world, rank = world_and_rank(self.trainer)
        b_lab = per_rank_batch_size(self.labeled_batch_size, world, "data.batch_size")
        b_unl = per_rank_batch_size(self.unlabeled_batch_size, world, "data.unlabeled_batch_size")
        per_rank_unlabeled = math.ceil(len(self.unlabeled) / world)  # DistributedSampler pads to this
        num_batches = math.ceil(per_rank_unlabeled / b_unl)
        sampler = KeyedCycleSampler(self.labeled, num_batches * b_lab, world, rank, shuffle=True, seed=self.seed)
        workers, pin = self.num_workers, self._on_gpu()
        labeled = resumable_loader(self.labeled, b_lab, sampler=sampler, num_workers=workers,
                                   collate_fn=collate_samples, pin_memory=pin, epoch=epoch_to_run(self.trainer))
        unlabeled = resumable_loader(self.unlabeled, b_unl, num_replicas=world, rank=rank, seed=self.seed,
                                     num_workers=workers, collate_fn=collate_two_views, pin_memory=pin,
                                     stream=1, epoch=epoch_to_run(self.trainer))
        return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="max_size_cycle")

