"""`method: density`: the CSRNet-style density-map counter, optionally with the mask-supervised
counting losses (`mask_loss`, METHODS.md A2.4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from crowdseg.errors import ConfigError
from crowdseg.methods.base import Job, Method
from crowdseg.methods.p2p import MaskLossConfig, check_mask_loss

ACTIVATIONS = ("softplus", "relu")


@dataclass
class BackboneConfig:
    """The density counter's front-end (crowdseg/models/backbone.py), cut at stride 8."""
    backbone: str = "vgg16_bn"
    pretrained: Optional[str] = None  # local path of backbone weights; None = random init


@dataclass
class DensityConfig:
    """The density-map counter (crowdseg/models/density.py, losses/density.py)."""
    channels: list[int] = field(default_factory=lambda: [512, 512, 512, 256, 128, 64])  # CSRNet back-end
    activation: str = "softplus"      # softplus | relu: keeps the density >= 0
    sigma: float = 4.0                # Gaussian of the target density (pixels); the target sums to the count


def check(cfg: DictConfig) -> None:
    d = cfg.density
    if d.activation not in ACTIVATIONS:
        raise ConfigError(f"key 'density.activation': {d.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not d.sigma > 0:
        raise ConfigError(f"key 'density.sigma': must be > 0, got {d.sigma}")
    if not d.channels or min(d.channels) < 1:
        raise ConfigError(f"key 'density.channels': expected a non-empty list of positive widths, got {list(d.channels)}")
    check_mask_loss(cfg.mask_loss)


def build(cfg: DictConfig, run_dir: Path, split=None) -> Job:
    from crowdseg.data import build_datamodule
    from crowdseg.lit.density import DensityModule
    from crowdseg.losses.density import DensityLoss
    from crowdseg.mask_supervision import density_mask_losses
    from crowdseg.models.backbone import create_backbone
    from crowdseg.models.density import DensityCounter

    m, d = cfg.model, cfg.density
    model = DensityCounter(create_backbone(m.backbone, m.pretrained, reductions=(8,)), list(d.channels), d.activation)
    datamodule = build_datamodule(cfg, split)
    mask_loss, one_point_loss = density_mask_losses(cfg, datamodule, model.stride)
    module = DensityModule(model, DensityLoss(model.stride, d.sigma), OmegaConf.to_object(cfg.optim), cfg.trainer.max_steps,
                           mask_loss, one_point_loss, cfg.mask_loss.one_point_threshold, run_dir, cfg.logger.num_pictures)
    return Job(module, datamodule)


METHOD = Method(name="density", sections={"model": BackboneConfig, "density": DensityConfig, "mask_loss": MaskLossConfig},
                build=build, check=check, summary="CSRNet-style density-map counter (+ optional mask-supervised losses)")
