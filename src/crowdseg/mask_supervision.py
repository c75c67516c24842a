"""Wiring of the mask-supervised counting losses: config section `mask_loss` -> loss modules.

The builders of `crowdseg.train` call these; the LightningModules receive ready-made modules and
plain values. When `mask_loss.enabled` is true the training set must carry instance masks:
- no training image has one -> `ConfigError` at build time (before anything trains);
- only some have -> a warning; a training batch in which some image has no mask skips the mask
  terms (the collated batch then has ``instance_map = None``) and logs ``train/mask_skipped = 1``.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from omegaconf import DictConfig

from crowdseg.errors import ConfigError
from crowdseg.losses.mask_counting import DensityMaskLoss, PointMaskLoss, SoftOnePointLoss

log = logging.getLogger(__name__)


def mask_coverage(dataset: Any) -> str:
    """"all", "some" or "none": which images of `dataset` carry an instance map.

    Datasets of records (`datamodules.dataset.CrowdDataset`) are judged by their records (a mask
    file or polygons), without decoding an image; wrappers with `.dataset` / `.datasets` (torch
    `Subset`, `ConcatDataset`) are unwrapped; any other dataset is judged by its first sample.
    """
    records = getattr(dataset, "records", None)
    if records is not None:
        has = [getattr(r, "mask_path", None) is not None or getattr(r, "polygons", None) is not None
               for r in records]
        return "all" if has and all(has) else "some" if any(has) else "none"
    if hasattr(dataset, "datasets"):
        parts = {mask_coverage(d) for d in dataset.datasets}
        return parts.pop() if len(parts) == 1 else "some"
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        return mask_coverage(dataset.dataset)
    if len(dataset) == 0:
        return "none"
    return "all" if dataset[0].get("instance_map") is not None else "none"


def require_training_masks(cfg: DictConfig, datamodule: Any) -> None:
    """Raise `ConfigError` when `mask_loss.enabled` but no training image has an instance mask."""
    if not cfg.mask_loss.enabled:
        return
    train = datamodule.datasets.get("train") if hasattr(datamodule, "datasets") else None
    if train is None:
        return
    coverage = mask_coverage(train)
    if coverage == "none":
        raise ConfigError(f"key 'mask_loss.enabled': the training images of data.name={cfg.data.name!r} carry "
                          f"no instance masks; generate masks (`crowdseg masks`) and point the data config at "
                          f"them, or set mask_loss.enabled=false")
    if coverage == "some":
        log.warning("mask_loss: only some training images of %s have instance masks; batches with an "
                    "image without one skip the mask terms (train/mask_skipped)", cfg.data.name)


def point_mask_loss(cfg: DictConfig, datamodule: Any) -> Optional[PointMaskLoss]:
    """The p2p mask loss of `cfg.mask_loss`, or None when it is disabled (checks the data first)."""
    ml = cfg.mask_loss
    if not ml.enabled:
        return None
    require_training_masks(cfg, datamodule)
    return PointMaskLoss(ml.background_weight, ml.mass_weight)


def density_mask_losses(cfg: DictConfig, datamodule: Any, stride: int
                        ) -> tuple[Optional[DensityMaskLoss], Optional[SoftOnePointLoss]]:
    """(DensityMaskLoss or None, SoftOnePointLoss or None) of `cfg.mask_loss` for a density model.

    The soft one-point term is built only when `one_point_weight` > 0.
    """
    ml = cfg.mask_loss
    if not ml.enabled:
        return None, None
    require_training_masks(cfg, datamodule)
    one_point = SoftOnePointLoss(stride, ml.one_point_weight, ml.temperature) if ml.one_point_weight > 0 else None
    return DensityMaskLoss(stride, ml.background_weight, ml.mass_weight), one_point
