"""Build datasets and DataModules from the experiment config (the wiring layer)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from datamodules.crowd import CrowdDataModule
from datamodules.dataset import build_dataset as _build_dataset
from datamodules.transforms import TrainTransform


def train_transform(cfg: DictConfig) -> TrainTransform:
    data = cfg.data
    return TrainTransform(crop_size=data.crop_size, scale_range=tuple(data.scale_range), hflip=data.hflip,
                          photometric=data.photometric, seed=cfg.seed)


def dataset_options(cfg: DictConfig, split: str) -> dict[str, Any]:
    """Keyword arguments of `datamodules.dataset.build_dataset` for `split`."""
    data = cfg.data
    if data.name == "synthetic":
        syn = data.synthetic
        sizes = {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}
        return {"num_images": sizes.get(split, syn.num_test), "height": syn.height, "width": syn.width,
                "min_people": syn.min_people, "max_people": syn.max_people, "seed": syn.seed}
    return {"on_bad_annotation": data.on_bad_annotation, "max_size": data.max_size, "cache_dir": data.cache_dir,
            "num_workers": data.num_workers, "masks_dir": masks_dir_of(cfg, split),
            **OmegaConf.to_container(data.reader_options, resolve=True)}


def masks_dir_of(cfg: DictConfig, split: str) -> str | None:
    """`data.masks_dir` for `split`: a "{split}" in the path is replaced by the split's name, so train
    and test images with the same file stem (ShanghaiTech's IMG_k) never share a mask folder."""
    return cfg.data.masks_dir.replace("{split}", split) if cfg.data.masks_dir else None


def build_dataset(cfg: DictConfig, split: str, train: bool = False) -> Dataset:
    """The dataset of `split` ("train", "val", "test" or a dataset-specific split name), whole images;
    `train=True` adds the training augmentations (random scale, crop, flip, photometric)."""
    return _build_dataset(cfg.data.name, cfg.data.root, split, transform=train_transform(cfg) if train else None,
                          **dataset_options(cfg, split))


def build_datamodule(cfg: DictConfig) -> CrowdDataModule:
    data = cfg.data
    return CrowdDataModule(
        train=build_dataset(cfg, data.train_split, train=True),
        val=build_dataset(cfg, data.val_split),
        test=build_dataset(cfg, data.test_split),
        predict=build_dataset(cfg, data.test_split),
        batch_size=data.batch_size, eval_batch_size=data.eval_batch_size, num_workers=data.num_workers)
