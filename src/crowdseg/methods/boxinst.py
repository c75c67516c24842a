"""`method: boxinst`: BoxInst (CondInst trained from boxes, METHODS.md B) with the optional OverlapLoss
(A3), the box-supervised baseline. Everything method-specific is under the `boxinst` section:

- `boxinst.model`: the detector (crowdseg/models/boxinst.py);
- `boxinst.loss`: FCOS, the projection / pairwise terms, proposal sampling and OverlapLoss (`overlap_weight`
  is lambda: 2 for crowds, 1 for COCO, 0 = plain BoxInst);
- `boxinst.input`: the paper's resizing (short side 384-480 for training, 480 for testing, long side
  <= 1333); `null` short sides keep the `data.crop_size` / `data.scale_range` augmentation instead;
- `boxinst.inference`: post-processing and the overlap metric's score threshold;
- `boxinst.solver`: SGD/AdamW and its step schedule (detectron2's WarmupMultiStepLR: a linear warm-up
  from `warmup_factor` over `warmup_steps`, then x `optim.gamma` at each of `milestones`, in steps),
  the one exception to `optim.step_size` (not used; crowdseg/optim.py); the learning rates, weight
  decay, decay factor, gradient clip and `optim.schedule` come from the shared `optim` section
  (`optim.schedule: cosine` is the shared warm-up cosine: `optim.warmup_steps`, no milestones);
- `boxinst.eval_data`: evaluate on another dataset than the training one (CIS for CrowdHuman, COCO
  val for COCO train); its images are removed from the training set;
- `boxinst.init_ckpt`: start from the weights of a BoxInst checkpoint (the OverlapLoss fine-tune
  recipe, or a synthetic run as the start of a real one); a resumed run still continues from its own
  `last.ckpt`;
- `boxinst.train_images`: `all`, or `overlapping`: only the training images where two training boxes
  overlap (the OverlapLoss fine-tune on crowds of people).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from crowdseg.errors import ConfigError, DataError
from crowdseg.methods.base import Job, Method

NORMS = ("auto", "bn", "frozen_bn")
BRANCH_NORMS = ("bn", "gn", "none")
OPTIMIZERS = ("sgd", "adamw")
OVERLAP_NORMALIZATIONS = ("instances", "pairs", "sum")
TRAIN_IMAGES = ("all", "overlapping")


@dataclass
class BoxInstModelConfig:
    """The detector (crowdseg/models/boxinst.py)."""
    backbone: str = "resnet50"            # a torchvision ResNet (resnet18/34/50/101, ...) or any timm model
    pretrained: Optional[str] = None      # local ImageNet weights file; None = random init
    fpn_channels: int = 256               # a multiple of 32 (the FCOS head's GroupNorm)
    norm: str = "auto"                    # ResNet norm: auto (frozen with pretrained weights, else BN) | bn | frozen_bn
    trainable_layers: int = 5             # ResNet stages that train (5: all; detectron2's FREEZE_AT=2 is 3)
    head_convs: int = 4
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    mask_channels: int = 16               # 16 in BoxInst (233 dynamic parameters), 8 in CondInst (169)
    mask_branch_norm: str = "bn"          # bn | gn | none
    dynamic_channels: int = 8
    dynamic_layers: int = 3
    sizes_of_interest: list[float] = field(default_factory=lambda: [64.0, 128.0, 256.0, 512.0])


@dataclass
class BoxInstLossConfig:
    """FCOS + BoxInst mask terms + OverlapLoss (crowdseg/losses/{fcos,boxinst}.py)."""
    box_key: str = "boxes"                # the training boxes: boxes | full_boxes | visible_boxes (reader keys)
    center_radius: float = 1.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    topk_proposals_per_image: int = 64    # mask-loss proposals per image, split over its GTs (<= 0: all)
    projection_weight: float = 1.0
    pairwise_weight: float = 1.0
    pairwise_threshold: float = 0.3       # colour-similarity threshold tau
    pairwise_dilation: int = 2
    pairwise_warmup: int = 10000          # steps of the pairwise term's linear warm-up (0: none)
    bottom_pixels_removed: float = 0.0    # AdelaiDet's COCO hack: 10 (rows at the image bottom ignored)
    overlap_weight: float = 0.0           # OverlapLoss lambda (0: off)
    overlap_normalization: str = "instances"  # instances | pairs | sum


@dataclass
class BoxInstInputConfig:
    """Resizing (datamodules/short_side.py)."""
    train_short_side: Optional[list[int]] = field(default_factory=lambda: [384, 480])  # [min, max]; null: data.crop_size / scale_range
    test_short_side: Optional[int] = 480  # null: evaluate at the stored size
    max_size: Optional[int] = 1333        # long side cap
    synthetic_person_scale: float = 1.0   # data.name=synthetic: people this many times larger (more occlusion)


@dataclass
class BoxInstInferenceConfig:
    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_threshold: float = 0.6
    max_detections: int = 100
    mask_threshold: float = 0.5
    paste_chunk: int = 32                 # masks pasted at full resolution this many at a time
    overlap_score_threshold: float = 0.3  # detections the overlap metric, pictures and predict keep
    box_masks: bool = False               # the box baseline: each detected box filled as its mask


@dataclass
class BoxInstSolverConfig:
    """The optimizer, and the `optim.schedule: step` schedule of boxinst (crowdseg.optim.warmup_multistep)."""
    optimizer: str = "sgd"                # sgd | adamw
    momentum: float = 0.9                 # sgd only
    milestones: list[int] = field(default_factory=list)  # steps at which the lr is multiplied by optim.gamma
    warmup_steps: int = 1000              # linear warm-up from warmup_factor x lr to lr (step schedule)
    warmup_factor: float = 0.001


@dataclass
class BoxInstEvalDataConfig:
    """Evaluate on another dataset (e.g. CIS for CrowdHuman training): null name = the `data` splits."""
    name: Optional[str] = None
    root: Optional[str] = None
    split: str = "all"
    reader_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BoxInstConfig:
    """The `boxinst` section, also the settings object `BoxInstModule` receives (checked by `check`)."""
    model: BoxInstModelConfig = field(default_factory=BoxInstModelConfig)
    loss: BoxInstLossConfig = field(default_factory=BoxInstLossConfig)
    input: BoxInstInputConfig = field(default_factory=BoxInstInputConfig)
    inference: BoxInstInferenceConfig = field(default_factory=BoxInstInferenceConfig)
    solver: BoxInstSolverConfig = field(default_factory=BoxInstSolverConfig)
    eval_data: BoxInstEvalDataConfig = field(default_factory=BoxInstEvalDataConfig)
    init_ckpt: Optional[str] = None       # BoxInst checkpoint whose `model.*` weights start the run (fine-tune)
    train_images: str = "all"             # all | overlapping: only images where two training boxes overlap


def _choice(value: Any, choices: tuple, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(choices)}")


def check(cfg: DictConfig) -> None:
    b = cfg.boxinst
    m, lo, inp, inf, so = b.model, b.loss, b.input, b.inference, b.solver
    _choice(m.norm, NORMS, "boxinst.model.norm")
    _choice(m.mask_branch_norm, BRANCH_NORMS, "boxinst.model.mask_branch_norm")
    _choice(lo.overlap_normalization, OVERLAP_NORMALIZATIONS, "boxinst.loss.overlap_normalization")
    _choice(so.optimizer, OPTIMIZERS, "boxinst.solver.optimizer")
    _choice(b.train_images, TRAIN_IMAGES, "boxinst.train_images")
    if b.train_images != "all" and cfg.data.name == "synthetic":
        raise ConfigError("key 'boxinst.train_images': the synthetic crowd has no stored boxes to select by; use all")
    if m.fpn_channels < 32 or m.fpn_channels % 32:
        raise ConfigError(f"key 'boxinst.model.fpn_channels': must be a positive multiple of 32, got {m.fpn_channels}")
    for key in ("head_convs", "mask_branch_channels", "mask_channels", "dynamic_channels"):
        if m[key] < 1:
            raise ConfigError(f"key 'boxinst.model.{key}': must be >= 1, got {m[key]}")
    if m.dynamic_layers < 1:
        raise ConfigError(f"key 'boxinst.model.dynamic_layers': must be >= 1, got {m.dynamic_layers}")
    if len(m.sizes_of_interest) != 4 or list(m.sizes_of_interest) != sorted(m.sizes_of_interest):
        raise ConfigError(f"key 'boxinst.model.sizes_of_interest': 4 increasing bounds for P3-P7, "
                          f"got {list(m.sizes_of_interest)}")
    for key in ("projection_weight", "pairwise_weight", "overlap_weight", "center_radius", "bottom_pixels_removed",
                "pairwise_warmup"):
        if lo[key] < 0:
            raise ConfigError(f"key 'boxinst.loss.{key}': must be >= 0, got {lo[key]}")
    if not 0 <= lo.pairwise_threshold <= 1:
        raise ConfigError(f"key 'boxinst.loss.pairwise_threshold': must be in [0, 1], got {lo.pairwise_threshold}")
    if lo.pairwise_dilation < 1:
        raise ConfigError(f"key 'boxinst.loss.pairwise_dilation': must be >= 1, got {lo.pairwise_dilation}")
    if inp.train_short_side is not None:
        sides = list(inp.train_short_side)
        if len(sides) != 2 or not 0 < sides[0] <= sides[1]:
            raise ConfigError(f"key 'boxinst.input.train_short_side': expected [min, max] with 0 < min <= max, got {sides}")
    if not inp.synthetic_person_scale > 0:
        raise ConfigError(f"key 'boxinst.input.synthetic_person_scale': must be > 0, got {inp.synthetic_person_scale}")
    if inp.test_short_side is not None and inp.test_short_side < 1:
        raise ConfigError(f"key 'boxinst.input.test_short_side': must be >= 1, got {inp.test_short_side}")
    for key in ("score_threshold", "nms_threshold", "mask_threshold", "overlap_score_threshold"):
        if not 0 <= inf[key] <= 1:
            raise ConfigError(f"key 'boxinst.inference.{key}': must be in [0, 1], got {inf[key]}")
    for key in ("pre_nms_topk", "max_detections", "paste_chunk"):
        if inf[key] < 1:
            raise ConfigError(f"key 'boxinst.inference.{key}': must be >= 1, got {inf[key]}")
    if so.warmup_steps < 0 or not 0 < so.warmup_factor <= 1:
        raise ConfigError("key 'boxinst.solver.warmup_factor': must be in (0, 1] (and warmup_steps >= 0)")


def build_model(m: DictConfig):
    from crowdseg.models.boxinst import build_boxinst

    return build_boxinst(m.backbone, m.pretrained, m.fpn_channels, m.norm, m.trainable_layers, head_convs=m.head_convs,
                         mask_branch_channels=m.mask_branch_channels, mask_branch_convs=m.mask_branch_convs,
                         mask_channels=m.mask_channels, mask_branch_norm=m.mask_branch_norm,
                         dynamic_channels=m.dynamic_channels, dynamic_layers=m.dynamic_layers,
                         sizes_of_interest=list(m.sizes_of_interest))


def _dataset(cfg: DictConfig, split: str, transform, names=None):
    """A split of `data` (the synthetic crowd with its whole-person boxes too)."""
    from crowdseg.data import dataset_options
    from datamodules.dataset import build_dataset

    opts = dataset_options(cfg, split)
    if cfg.data.name == "synthetic":
        opts["full_boxes"] = True  # the whole-person boxes beside the visible ones
        opts["person_scale"] = cfg.boxinst.input.synthetic_person_scale
    return build_dataset(cfg.data.name, cfg.data.root, split, transform=transform, names=names, **opts)


def boxes_overlap(boxes: np.ndarray) -> bool:
    """Whether two of the boxes (N, 4) xyxy share an area > 0."""
    if len(boxes) < 2:
        return False
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    np.fill_diagonal(inter, 0)
    return bool((inter > 0).any())


def with_overlapping_people(train):
    """The training images where two people's boxes overlap (`boxinst.train_images: overlapping`)."""
    names = [r.name for r in train.records if r.boxes is not None and boxes_overlap(r.boxes)]
    if not names:
        raise DataError("key 'boxinst.train_images': no training image has two overlapping boxes")
    return train.subset(names)


def _test_dataset(cfg: DictConfig, transform):
    """The test split, built on first use (a module-level function: DDP spawn pickles it), with its
    ground truth as published (exact duplicate points kept, as in `crowdseg.data.build_test_dataset`)."""
    from crowdseg.data import split_names, with_published_points

    cfg = with_published_points(cfg)
    data = cfg.data
    return _dataset(cfg, data.test_split, transform, split_names(cfg, data.test_split, "test_list") if data.test_list else None)


def build_datamodule(cfg: DictConfig, split=None):
    """Training set (labeled images of `data`, boxes only), val / test sets with instance masks."""
    from functools import partial

    from crowdseg.data import plan_split, split_names, train_transform
    from datamodules.dataset import build_dataset
    from datamodules.detection import DetectionDataModule
    from datamodules.short_side import ShortSideEvalTransform, ShortSideTrainTransform

    data, inp = cfg.data, cfg.boxinst.input
    if inp.train_short_side is not None:
        train_tf = ShortSideTrainTransform(list(inp.train_short_side), inp.max_size, data.hflip, data.photometric, cfg.seed)
    else:
        train_tf = train_transform(cfg)
    eval_tf = ShortSideEvalTransform(inp.test_short_side, inp.max_size)

    dataset = partial(_dataset, cfg)
    ev = cfg.boxinst.eval_data
    if ev.name is not None:
        extra = OmegaConf.to_container(ev.reader_options, resolve=True)
        evaluation = build_dataset(ev.name, ev.root, ev.split, transform=eval_tf, max_size=None,
                                   on_bad_annotation=data.on_bad_annotation, **extra)
        excluded = set(evaluation.names)
        split = split or plan_split(cfg)
        train = dataset(data.train_split, train_tf, [n for n in split.labeled if n not in excluded])
        if cfg.boxinst.train_images == "overlapping":
            train = with_overlapping_people(train)
        module = DetectionDataModule(train, evaluation, evaluation, data.batch_size, data.eval_batch_size,
                                     data.num_workers)
        module.datasets["predict"] = evaluation
    else:
        split = split or plan_split(cfg)
        train = dataset(data.train_split, train_tf, split.labeled)
        if cfg.boxinst.train_images == "overlapping":
            train = with_overlapping_people(train)
        if split.val is not None:
            val = dataset(data.train_split, eval_tf, split.val)
        else:
            val = dataset(data.val_split, eval_tf, split_names(cfg, data.val_split, "val_list") if data.val_list else None)
        module = DetectionDataModule(train, val, None, data.batch_size, data.eval_batch_size, data.num_workers)
        module.datasets["test"] = module.datasets["predict"] = partial(_test_dataset, cfg, eval_tf)
    return module


def build(cfg: DictConfig, run_dir: Path, split=None) -> Job:
    from crowdseg.lit.boxinst import BoxInstModule
    from crowdseg.methods.weights import load_weights

    model = build_model(cfg.boxinst.model)
    if cfg.boxinst.init_ckpt:
        load_weights(model, cfg.boxinst.init_ckpt, "boxinst.init_ckpt", hint="train the BoxInst run first")
    datamodule = build_datamodule(cfg, split)
    module = BoxInstModule(model, OmegaConf.to_object(cfg.boxinst), OmegaConf.to_object(cfg.optim), cfg.trainer.max_steps,
                           run_dir, cfg.logger.num_pictures, cfg.seed)
    return Job(module, datamodule)


METHOD = Method(name="boxinst", sections={"boxinst": BoxInstConfig}, build=build, check=check,
                summary="BoxInst from boxes (+ OverlapLoss fine-tune): the box-supervised baseline")
