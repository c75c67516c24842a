"""`CrowdDataModule`: the fully supervised DataModule, agnostic of where its datasets come from."""
from __future__ import annotations

from typing import Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset

from crowdseg.errors import ConfigError
from datamodules.distributed import per_rank_batch_size, world_and_rank
from datamodules.resumable import epoch_to_run, resumable_loader
from datamodules.types import collate_samples


class CrowdDataModule(L.LightningDataModule):
    """Wraps ready-made train/val/test datasets of samples (datamodules/types.py).

    `batch_size` is the *global* training batch size; each of the `world_size` processes loads
    `batch_size // world_size`. The training loader is resumable (datamodules/resumable.py): a
    stateful DistributedSampler gives every rank a disjoint shard, in an order drawn from (`seed`,
    epoch), and a killed run continues mid-epoch with the same batches and augmentations. `seed`
    None: `seed_everything`'s seed (as Lightning's own DistributedSampler). Lightning injects a
    DistributedSampler into the val / test loaders under DDP.
    """

    def __init__(self, train: Optional[Dataset] = None, val: Optional[Dataset] = None,
                 test: Optional[Dataset] = None, predict: Optional[Dataset] = None,
                 batch_size: int = 8, eval_batch_size: int = 1, num_workers: int = 0, seed: Optional[int] = None):
        super().__init__()
        self.datasets = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed = seed

    def dataset(self, stage: str) -> Dataset:
        """The dataset of `stage`; one given as a zero-argument factory (e.g. a test split that is not
        on disk while training) is built on first use."""
        dataset = self.datasets[stage]
        if dataset is None:
            raise ConfigError(f"no {stage} dataset is configured")
        if callable(dataset) and not isinstance(dataset, Dataset):
            dataset = self.datasets[stage] = dataset()
        return dataset

    def _loader(self, stage: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.dataset(stage)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate_samples, persistent_workers=self.num_workers > 0,
                          pin_memory=self._on_gpu(), drop_last=shuffle and len(dataset) >= batch_size)

    def _on_gpu(self) -> bool:
        """Batches go to a CUDA device: collate into page-locked memory (faster, asynchronous copies)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        world, rank = world_and_rank(self.trainer)
        dataset = self.dataset("train")
        batch_size = per_rank_batch_size(self.batch_size, world)
        return resumable_loader(dataset, batch_size, num_replicas=world, rank=rank, seed=self.seed,
                                drop_last=len(dataset) >= batch_size, num_workers=self.num_workers,
                                collate_fn=collate_samples, pin_memory=self._on_gpu(), epoch=epoch_to_run(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size, shuffle=False)
