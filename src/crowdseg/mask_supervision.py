"""Wiring of the mask-supervised counting losses: config section `mask_loss` -> loss modules.

The builders of `crowdseg.train` call these; the LightningModules receive ready-made modules and
plain values. When `mask_loss.enabled` is true the training set must carry instance masks:
- no training image has one -> `ConfigError` at build time (before anything trains);
- only some have -> a warning; a training batch in which some image has no mask skips the mask
  terms (the collated batch then has ``instance_map = None``) and logs ``train/mask_skipped = 1``.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

from omegaconf import DictConfig

from crowdseg.errors import ConfigError
from crowdseg.losses.mask_counting import DensityMaskLoss, PointMaskLoss, SoftOnePointLoss

log = logging.getLogger(__name__)


class MaskCoverage(NamedTuple):
    """Which images of a dataset carry an instance map: `state` "all", "some" or "none", and
    `first_missing`, the name of the first image without one (None when all have one, or there is
    no image)."""
    state: str
    first_missing: Optional[str] = None


def mask_coverage(dataset: Any) -> MaskCoverage:
    """Which images of `dataset` carry an instance map.

    Datasets of records (`datamodules.dataset.CrowdDataset`) are judged by their records (a mask
    file or polygons, an empty list of polygons being an image without people), without decoding
    an image; wrappers with `.dataset` / `.datasets` (torch `Subset`, `ConcatDataset`) are
    unwrapped; any other dataset is judged by its first sample.
    """
    records = getattr(dataset, "records", None)
    if records is not None:
        missing = [r.name for r in records
                   if getattr(r, "mask_path", None) is None and getattr(r, "polygons", None) is None]
        state = "none" if len(missing) == len(records) else "some" if missing else "all"
        return MaskCoverage(state, missing[0] if missing else None)
    if hasattr(dataset, "datasets"):
        parts = [mask_coverage(d) for d in dataset.datasets]
        states = {part.state for part in parts}
        first_missing = next((part.first_missing for part in parts if part.first_missing), None)
        return MaskCoverage(states.pop() if len(states) == 1 else "some", first_missing)
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        return mask_coverage(dataset.dataset)
    if len(dataset) == 0:
        return MaskCoverage("none")
    sample = dataset[0]
    if sample.get("instance_map") is not None:
        return MaskCoverage("all")
    return MaskCoverage("none", str((sample.get("meta") or {}).get("name", "image 0")))


def require_training_masks(cfg: DictConfig, datamodule: Any) -> None:
    """Raise `ConfigError` when `mask_loss.enabled` but no training image has an instance mask."""
    if not cfg.mask_loss.enabled:
        return
    train = datamodule.datasets.get("train") if hasattr(datamodule, "datasets") else None
    if train is None:
        return
    coverage = mask_coverage(train).state
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
