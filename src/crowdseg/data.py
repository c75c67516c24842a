"""Build datasets and DataModules from the experiment config (the wiring layer)."""
from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import Dataset

from crowdseg.errors import ConfigError
from datamodules.crowd import CrowdDataModule
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec


def build_dataset(cfg: DictConfig, split: str, train: bool = False) -> Dataset:
    """The dataset of `split` ("train", "val", "test" or a dataset-specific split name).

    `train=True` adds the training augmentations.
    """
    data = cfg.data
    if data.name == "synthetic":
        syn = data.synthetic
        spec = SyntheticSpec(height=syn.height, width=syn.width, min_people=syn.min_people,
                             max_people=syn.max_people, seed=syn.seed)
        sizes = {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}
        if split not in sizes:
            raise ConfigError(f"key 'data.*_split': the synthetic crowd has splits train/val/test, not {split!r}")
        return SyntheticCrowd(sizes[split], split, spec)
    raise ConfigError(f"key 'data.name': unknown dataset {data.name!r}")


def build_datamodule(cfg: DictConfig) -> CrowdDataModule:
    data = cfg.data
    return CrowdDataModule(
        train=build_dataset(cfg, data.train_split, train=True),
        val=build_dataset(cfg, data.val_split),
        test=build_dataset(cfg, data.test_split),
        predict=build_dataset(cfg, data.test_split),
        batch_size=data.batch_size, eval_batch_size=data.eval_batch_size, num_workers=data.num_workers)
