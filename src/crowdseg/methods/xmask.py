"""`method: xmask`: semi-supervised crowd counting and instance segmentation with a mean teacher and
three phases (METHODS.md A2; crowdseg/lit/xmask.py, docs/xmask.md).

The labeled images of `data` (label fraction or `data.labeled_list`) train with their points and
instance masks; with `xmask.semi` the other training images are the unlabeled pool (weak view to the
teacher, strong view + cutout to the student). `xmask.semi: false` is the supervised-only control on
the same labeled images and schedule; `xmask.unlabeled_targets: oracle` gives the unlabeled branch the
unlabeled images' true points instead of the teacher's (a diagnostic upper bound of the branch).
`xmask.init_ckpt` starts student and teacher from an XMask checkpoint (e.g. a converged supervised
run), so the unlabeled branch starts from a competent teacher; `xmask.evaluate` picks the network
that selects best.ckpt and predicts (validation and test always report both).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from crowdseg.errors import ConfigError, DataError
from crowdseg.methods.base import Job, Method

GROUPS = ("encoder", "fuse", "decoder", "mask_head")
UNITS = ("epoch", "step")
PHOTOMETRIC = ("none", "weak", "strong")
TARGETS = ("teacher", "oracle")
NETWORKS = ("student", "teacher")
TEACHER_BUFFERS = ("copy", "ema")


@dataclass
class XMaskModelConfig:
    """The XMask network (crowdseg/models/xmask.py); the backbone needs feature maps at strides 8 and 16."""
    backbone: str = "vgg16_bn"
    pretrained: Optional[str] = None  # local path of backbone weights; None = random init
    fuse_channels: int = 256
    decoder_channels: int = 256
    mask_channels: int = 256
    emb_dim: int = 16


@dataclass
class XMaskConfig:
    """Teacher-student schedule, losses and pseudo masks (METHODS.md A2.2-A2.6); published defaults."""
    semi: bool = True                 # False: supervised-only control (labeled images only, no teacher branch)
    unlabeled_targets: str = "teacher"  # teacher (published) | oracle: the unlabeled images' true points
    target_threshold: float = 0.0     # teacher cells with logit >= this are P2R targets (0: published)
    init_ckpt: Optional[str] = None   # XMask checkpoint whose student (and teacher) start the run
    evaluate: str = "student"         # the network that selects best.ckpt and predicts: student | teacher
    teacher_buffers: str = "copy"     # teacher BatchNorm statistics: copy the student's (published) | ema
    unlabeled_batch_size: Optional[int] = None  # global; None: data.batch_size
    ema_momentum: float = 0.998
    # schedule: phase 1 [0, phase1_end), phase 2 [phase1_end, phase2_end), phase 3 after; in `phase_unit`s
    phase_unit: str = "epoch"         # epoch | step
    phase1_end: int = 1500
    phase2_end: int = 2000
    phase1_groups: list[str] = field(default_factory=lambda: ["encoder", "fuse", "decoder"])
    phase2_groups: list[str] = field(default_factory=lambda: ["fuse", "mask_head"])
    phase3_groups: list[str] = field(default_factory=lambda: ["fuse", "decoder"])
    phase2_lr: Optional[float] = 5e-6  # None: optim.lr
    phase3_lr: Optional[float] = None  # None: optim.lr
    semi_warmup: int = 50             # phases 1-2: units before the unlabeled branch
    ramp_rate: float = 0.01           # unlabeled weight w grows by this per unit ...
    ramp_max: float = 2.0             # ... up to this; total (sup + w semi) / (1 + w)
    phase3_ramp_start: float = 0.1
    # views
    weak: str = "none"                # teacher view photometric: none | weak | strong
    strong: str = "strong"            # student view photometric
    cutout: bool = True               # erase a rectangle of the student view
    # P2R (A2.2)
    p2r_min_radius: float = 8.0
    p2r_max_radius: float = 96.0
    p2r_cost_point: float = 8.0
    # discriminative loss (A2.3)
    tau: float = 0.6
    margin: float = 0.1
    point_mask_weight: float = 1.0
    soft_point_mask: bool = False     # point-mask term weighted by sigmoid(logit) (trains the decoder; add it to phase2_groups)
    invalid_radius: float = 16.0      # unlabeled: discs around unsure teacher points left out
    max_radius_factor: float = 0.5
    smooth_kernel: int = 7
    smooth_sigma: float = 1.5
    # mask constraint (A2.4)
    mc_background_weight: float = 0.0
    mc_mass_weight: float = 0.005
    mc_one_point_weight: float = 0.0  # soft (differentiable) one-point term; the published count is logged
    one_point_temperature: float = 1.0
    mc_with_p2r: bool = True          # p2r_mc (True) or mc_only
    # pseudo masks (A2.5)
    energy_threshold: float = 0.8
    lambda_geo: float = 0.6
    p_low: float = 0.1
    p_mid: float = 0.5
    p_high: float = 0.9
    # evaluation (A2.8): predicted instance maps
    eval_energy_threshold: float = 1.1
    eval_lambda_geo: float = 0.8
    eval_sigma: float = 3.0
    eval_teacher: bool = True         # also report the teacher's metrics (teacher_<key>)


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"key '{key}': {message}")


def check(cfg: DictConfig) -> None:
    x, m = cfg.xmask, cfg.model
    for key, choices in (("phase_unit", UNITS), ("unlabeled_targets", TARGETS), ("evaluate", NETWORKS),
                         ("teacher_buffers", TEACHER_BUFFERS)):
        if x[key] not in choices:
            _fail(f"xmask.{key}", f"{x[key]!r} is not one of {', '.join(choices)}")
    if x.evaluate == "teacher" and not x.eval_teacher:
        _fail("xmask.eval_teacher", "must be true when xmask.evaluate=teacher")
    if x.phase1_end < 0:
        _fail("xmask.phase1_end", f"must be >= 0, got {x.phase1_end}")
    if x.phase2_end < x.phase1_end:
        _fail("xmask.phase2_end", f"must be >= xmask.phase1_end ({x.phase1_end}), got {x.phase2_end}")
    for phase in (1, 2, 3):
        key = f"phase{phase}_groups"
        unknown = [g for g in x[key] if g not in GROUPS]
        if unknown:
            _fail(f"xmask.{key}", f"unknown parameter group(s) {unknown}; known: {', '.join(GROUPS)}")
    if not 0.0 <= x.ema_momentum <= 1.0:
        _fail("xmask.ema_momentum", f"must be in [0, 1], got {x.ema_momentum}")
    for key in ("weak", "strong"):
        if x[key] not in PHOTOMETRIC:
            _fail(f"xmask.{key}", f"{x[key]!r} is not one of {', '.join(PHOTOMETRIC)}")
    if not 0 < x.p_low <= x.p_mid <= x.p_high < 1:
        _fail("xmask.p_low", f"need 0 < p_low <= p_mid <= p_high < 1, got {x.p_low}, {x.p_mid}, {x.p_high}")
    for key in ("tau", "one_point_temperature", "energy_threshold", "eval_energy_threshold", "smooth_sigma",
                "eval_sigma", "p2r_min_radius", "max_radius_factor"):
        if not x[key] > 0:
            _fail(f"xmask.{key}", f"must be > 0, got {x[key]}")
    for key in ("margin", "point_mask_weight", "invalid_radius", "mc_background_weight", "mc_mass_weight",
                "mc_one_point_weight", "lambda_geo", "eval_lambda_geo", "ramp_rate", "ramp_max", "phase3_ramp_start"):
        if x[key] < 0:
            _fail(f"xmask.{key}", f"must be >= 0, got {x[key]}")
    if x.p2r_max_radius < x.p2r_min_radius:
        _fail("xmask.p2r_max_radius", f"must be >= xmask.p2r_min_radius ({x.p2r_min_radius})")
    if x.smooth_kernel < 1:
        _fail("xmask.smooth_kernel", f"must be >= 1, got {x.smooth_kernel}")
    for key in ("phase2_lr", "phase3_lr"):
        if x[key] is not None and x[key] < 0:
            _fail(f"xmask.{key}", f"must be >= 0, got {x[key]}")
    if x.unlabeled_batch_size is not None and x.unlabeled_batch_size < 1:
        _fail("xmask.unlabeled_batch_size", f"must be >= 1, got {x.unlabeled_batch_size}")
    for key in ("fuse_channels", "decoder_channels", "mask_channels", "emb_dim"):
        if m[key] < 1:
            _fail(f"model.{key}", f"must be >= 1, got {m[key]}")


# ------------------------------------------------------------------------------------------ build
def build_model(m: DictConfig):
    from crowdseg.models.backbone import create_backbone
    from crowdseg.models.xmask import XMaskNet

    return XMaskNet(create_backbone(m.backbone, m.pretrained, reductions=(8, 16)), m.fuse_channels,
                    m.decoder_channels, m.mask_channels, m.emb_dim)


def build_module(cfg: DictConfig, model, run_dir: Optional[Path]):
    from crowdseg.lit.xmask import XMaskModule
    from crowdseg.losses.xmask import DiscriminativeLoss, MaskConstraintLoss, P2RLoss
    from crowdseg.xmask.pseudo_masks import PseudoMaskSettings
    from crowdseg.xmask.schedule import PhaseSchedule, default_phase_lrs

    x, o = cfg.xmask, cfg.optim
    schedule = PhaseSchedule(unit=x.phase_unit, phase1_end=x.phase1_end, phase2_end=x.phase2_end,
                             semi_warmup=x.semi_warmup, ramp_rate=x.ramp_rate, ramp_max=x.ramp_max,
                             phase3_ramp_start=x.phase3_ramp_start,
                             groups={p: tuple(x[f"phase{p}_groups"]) for p in (1, 2, 3)})
    stride = model.stride
    return XMaskModule(
        model, schedule, OmegaConf.to_object(o), default_phase_lrs(o.lr, o.backbone_lr, x.phase2_lr, x.phase3_lr),
        cfg.trainer.max_steps,
        p2r=P2RLoss(stride, min_radius=x.p2r_min_radius, max_radius=x.p2r_max_radius, cost_point=x.p2r_cost_point),
        discriminative=DiscriminativeLoss(stride, tau=x.tau, margin=x.margin, point_mask_weight=x.point_mask_weight,
                                          max_radius_factor=x.max_radius_factor, kernel_size=x.smooth_kernel,
                                          sigma=x.smooth_sigma),  # min_radius: crowdseg.xmask.discs.MIN_RADIUS
        mask_constraint=MaskConstraintLoss(stride, background_weight=x.mc_background_weight,
                                           mass_weight=x.mc_mass_weight, one_point_weight=x.mc_one_point_weight,
                                           temperature=x.one_point_temperature),
        semi=x.semi, ema_momentum=x.ema_momentum,
        pseudo=PseudoMaskSettings(energy_threshold=x.energy_threshold, lambda_geo=x.lambda_geo, p_low=x.p_low,
                                  p_mid=x.p_mid, p_high=x.p_high, kernel_size=x.smooth_kernel, sigma=x.smooth_sigma),
        eval_pseudo=PseudoMaskSettings(energy_threshold=x.eval_energy_threshold, lambda_geo=x.eval_lambda_geo,
                                       p_low=x.p_low, p_mid=x.p_mid, p_high=x.p_high, kernel_size=x.smooth_kernel,
                                       sigma=x.eval_sigma),
        invalid_radius=x.invalid_radius, mc_with_p2r=x.mc_with_p2r, soft_point_mask=x.soft_point_mask,
        eval_teacher=x.eval_teacher, run_dir=run_dir, oracle=x.unlabeled_targets == "oracle",
        target_threshold=x.target_threshold, evaluate=x.evaluate, teacher_buffers=x.teacher_buffers)


def reaches_phase2(cfg: DictConfig) -> bool:
    """Whether the run's budget (trainer.max_epochs / max_steps) goes past phase 1 (masks needed)."""
    x, t = cfg.xmask, cfg.trainer
    if x.phase_unit == "epoch":
        return t.max_epochs is None or t.max_epochs < 0 or t.max_epochs > x.phase1_end
    return t.max_steps is None or t.max_steps < 0 or t.max_steps > x.phase1_end


def build_datamodule(cfg: DictConfig, split=None):
    """Labeled (points + masks, training crops) and, with `xmask.semi`, unlabeled (two views) training
    sets of the run's label split (crowdseg.data.plan_split), val and test (whole images)."""
    from crowdseg.data import build_dataset, build_eval_datasets, plan_split
    from crowdseg.mask_supervision import mask_coverage
    from datamodules.crowd import CrowdDataModule
    from datamodules.semi import SemiSupervisedDataModule
    from datamodules.transforms import TwoViewTransform

    data, x = cfg.data, cfg.xmask
    split = split or plan_split(cfg)
    evals = build_eval_datasets(cfg, split)
    labeled = build_dataset(cfg, data.train_split, train=True, names=split.labeled)
    missing = mask_coverage(labeled).first_missing if reaches_phase2(cfg) else None
    if missing is not None:
        raise DataError(f"xmask phases 2-3 train on instance masks of the labeled images, and {missing} has none: "
                        f"set data.masks_dir to its id maps (e.g. from `crowdseg masks`), or keep the run in phase 1")
    if not x.semi:
        datamodule = CrowdDataModule(train=labeled, val=evals["val"], test=evals["test"], predict=evals["test"],
                                     batch_size=data.batch_size, eval_batch_size=data.eval_batch_size,
                                     num_workers=data.num_workers)
    else:
        if not split.unlabeled:
            raise ConfigError("key 'data.label_fraction': every training image is labeled, so xmask has no unlabeled "
                              "image (use a fraction below 100, or xmask.semi=false)")
        views = TwoViewTransform(crop_size=data.crop_size, scale_range=tuple(data.scale_range), hflip=data.hflip,
                                 weak=x.weak, strong=x.strong, cutout=x.cutout, seed=cfg.seed)
        unlabeled = build_dataset(cfg, data.train_split, names=split.unlabeled, transform=views, with_masks=False)
        datamodule = SemiSupervisedDataModule(labeled, unlabeled, val=evals["val"], test=evals["test"],
                                              predict=evals["test"], labeled_batch_size=data.batch_size,
                                              unlabeled_batch_size=x.unlabeled_batch_size or data.batch_size,
                                              eval_batch_size=data.eval_batch_size, num_workers=data.num_workers,
                                              seed=cfg.seed)
    return datamodule


def load_start(module, path: str) -> None:
    """Student and teacher from an XMask checkpoint (`xmask.init_ckpt`); a checkpoint without a teacher
    (or a plain state dict) starts the teacher as a copy of the student."""
    from crowdseg.methods.weights import load_weights

    key, hint = "xmask.init_ckpt", "train the supervised run first (xmask.semi=false)"
    load_weights(module.model, path, key, hint=hint, method="xmask")
    try:
        load_weights(module.teacher.module, path, key, prefixes=("teacher.module.",), method="xmask")
    except ConfigError as err:
        if "holds no" not in str(err):
            raise
        module.teacher.module.load_state_dict(module.model.state_dict())
    module.teacher.n_averaged.fill_(1)  # an AveragedModel that has averaged nothing copies the student at its first update


def build(cfg: DictConfig, run_dir: Path, split=None) -> Job:
    datamodule = build_datamodule(cfg, split)
    module = build_module(cfg, build_model(cfg.model), run_dir)
    if cfg.xmask.init_ckpt:
        load_start(module, cfg.xmask.init_ckpt)
    return Job(module, datamodule)


METHOD = Method(name="xmask", sections={"model": XMaskModelConfig, "xmask": XMaskConfig}, build=build, check=check,
                summary="XMask: mean-teacher counting + instance masks from points at 5/10/40 % labels")
