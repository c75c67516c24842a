"""`method: p2p`: the P2PNet-style point predictor (METHODS.md C), optionally with the
mask-supervised counting losses (`mask_loss`, METHODS.md A2.4)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from crowdseg.choices import CLS_LOSSES, MASK_POINTS, MATCH_ON
from crowdseg.errors import ConfigError
from crowdseg.methods.base import Job, Method

@dataclass
class PointModelConfig:
    """The P2PNet-style point predictor (crowdseg/models/p2p.py)."""
    backbone: str = "vgg16_bn"
    pretrained: Optional[str] = None  # local path of backbone weights; None = random init
    fpn_channels: int = 256
    head_channels: int = 256
    anchor_rows: int = 2
    anchor_cols: int = 2
    regression_scale: float = 100.0   # gamma: point = anchor + gamma * regression
    cls_prior: Optional[float] = None  # initial person probability of every anchor; null: PyTorch's init (P2PNet)


@dataclass
class PointLossConfig:
    """P2PNet matching and loss (crowdseg/losses/p2p.py)."""
    cost_class: float = 1.0
    cost_point: float = 0.05
    eos_coef: float = 0.5
    point_loss_coef: float = 2e-4
    score_threshold: float = 0.5
    cls_loss: str = "ce"              # ce: P2PNet's weighted cross-entropy | focal: focal loss over positives
    focal_gamma: float = 2.0
    match_on: str = "predicted"       # matching distance from: predicted points (P2PNet) | anchors (fixed targets)
    merge_radius: float = 0.0         # decoding: 0 = plain threshold (P2PNet); r > 0 merges predictions within r px


@dataclass
class MaskLossConfig:
    """Mask-supervised counting losses (crowdseg/losses/mask_counting.py, METHODS.md A2.4), p2p and density.

    Needs instance masks in the training set (the synthetic crowd's own, or DPMO masks via the data config).
    """
    enabled: bool = False
    background_weight: float = 1.0    # no density / person probability on background pixels
    mass_weight: float = 1.0          # unit mass per instance (p2p: the scores inside a mask sum to 1)
    one_point_weight: float = 0.0     # density only: soft one-point-per-instance term
    temperature: float = 1.0          # density only: soft count = sigmoid(log(density / threshold) / T)
    one_point_threshold: float = 0.25  # density only: a stride-8 cell "is a point" above this density
    points: str = "predicted"         # p2p only: score the predicted points | the anchors


def check_mask_loss(ml: DictConfig) -> None:
    if ml.points not in MASK_POINTS:
        raise ConfigError(f"key 'mask_loss.points': {ml.points!r} is not one of {', '.join(MASK_POINTS)}")
    for key in ("temperature", "one_point_threshold"):
        if not ml[key] > 0:
            raise ConfigError(f"key 'mask_loss.{key}': must be > 0, got {ml[key]}")
    for key in ("background_weight", "mass_weight", "one_point_weight"):
        if ml[key] < 0:
            raise ConfigError(f"key 'mask_loss.{key}': must be >= 0, got {ml[key]}")


def check_point_model(m: DictConfig, lo: DictConfig) -> None:
    for key in ("fpn_channels", "head_channels", "anchor_rows", "anchor_cols"):
        if m[key] < 1:
            raise ConfigError(f"key 'model.{key}': must be >= 1, got {m[key]}")
    if not 0 < lo.score_threshold < 1:
        raise ConfigError(f"key 'loss.score_threshold': must be in (0, 1), got {lo.score_threshold}")
    for key in ("cost_class", "cost_point", "eos_coef", "point_loss_coef", "focal_gamma", "merge_radius"):
        if lo[key] < 0:
            raise ConfigError(f"key 'loss.{key}': must be >= 0, got {lo[key]}")
    for key, choices in (("cls_loss", CLS_LOSSES), ("match_on", MATCH_ON)):
        if lo[key] not in choices:
            raise ConfigError(f"key 'loss.{key}': {lo[key]!r} is not one of {', '.join(choices)}")
    if m.cls_prior is not None and not 0 < m.cls_prior < 1:
        raise ConfigError(f"key 'model.cls_prior': must be in (0, 1) or null, got {m.cls_prior}")


def check(cfg: DictConfig) -> None:
    check_point_model(cfg.model, cfg.loss)
    check_mask_loss(cfg.mask_loss)


def build_point_predictor(m: DictConfig):
    """The `PointPredictor` of a `model:` section (also the RPS proposer)."""
    from crowdseg.models.backbone import create_backbone
    from crowdseg.models.p2p import PointPredictor

    return PointPredictor(create_backbone(m.backbone, m.pretrained, reductions=(8, 16)), m.fpn_channels,
                          m.head_channels, m.anchor_rows, m.anchor_cols, m.regression_scale, m.cls_prior)


def build_point_loss(lo: DictConfig):
    from crowdseg.losses.p2p import P2PLoss

    return P2PLoss(lo.cost_class, lo.cost_point, lo.eos_coef, lo.point_loss_coef, lo.cls_loss, lo.focal_gamma, lo.match_on)


def build(cfg: DictConfig, run_dir: Path, split=None) -> Job:
    from crowdseg.data import build_datamodule
    from crowdseg.lit.p2p import PointPredictorModule
    from crowdseg.mask_supervision import point_mask_loss

    datamodule = build_datamodule(cfg, split)
    module = PointPredictorModule(build_point_predictor(cfg.model), build_point_loss(cfg.loss),
                                  OmegaConf.to_object(cfg.optim), cfg.trainer.max_steps, cfg.loss.score_threshold,
                                  run_dir, cfg.logger.num_pictures, point_mask_loss(cfg, datamodule),
                                  cfg.mask_loss.points, cfg.loss.merge_radius)
    return Job(module, datamodule)


METHOD = Method(name="p2p", sections={"model": PointModelConfig, "loss": PointLossConfig, "mask_loss": MaskLossConfig},
                build=build, check=check, summary="P2PNet-style point predictor (+ optional mask-supervised losses)")
