"""Typed configuration schema: every key an experiment YAML may set, with its default.

Each section is a small dataclass; `ExperimentConfig` composes them. OmegaConf merges experiment
files and `key=value` overrides onto this schema, so an unknown key, a wrong type or a missing
required value fails before anything runs (see `crowdseg.config.load`). `None` means "the
component's own default".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class SyntheticConfig:
    """The built-in synthetic crowd (datamodules/synthetic.py)."""
    num_train: int = 64
    num_val: int = 16
    num_test: int = 16
    height: int = 256
    width: int = 256
    min_people: int = 5
    max_people: int = 120
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "synthetic"          # synthetic | sha | shb | qnrf | ucf_cc_50 | jhu | nwpu | cclabeler | ...
    root: Optional[str] = None       # dataset root on disk (not used by `synthetic`)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    batch_size: int = 8              # global batch size, divided by the world size
    eval_batch_size: int = 1
    num_workers: int = 2
    crop_size: Optional[int] = 128   # square training crop; None trains on whole images
    max_size: Optional[int] = None   # resize so the long side is at most this (preprocessing cache)
    label_fraction: float = 100.0    # percent of labeled training images (5, 10, 40 or 100)
    split_seed: int = 0              # seed of the label-fraction split (independent of `seed`)
    on_bad_annotation: str = "fail"  # fail | skip (the image) | drop (only the bad points)
    cache_dir: Optional[str] = None  # preprocessing cache (resized images + labels); None reads the files
    masks_dir: Optional[str] = None  # instance-id maps `<image stem>.png|.npy` (e.g. from `crowdseg masks`);
                                     # "{split}" in the path becomes the split name (masks/{split})
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # training random scale
    hflip: float = 0.5               # training horizontal-flip probability
    photometric: str = "none"        # training colour jitter / blur: none | weak | strong
    reader_options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset reader
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The P2PNet-style point predictor (crowdseg/models/p2p.py)."""
    backbone: str = "vgg16_bn"
    pretrained: Optional[str] = None  # local path of backbone weights; None = random init
    fpn_channels: int = 256
    head_channels: int = 256
    anchor_rows: int = 2
    anchor_cols: int = 2
    regression_scale: float = 100.0   # gamma: point = anchor + gamma * regression


@dataclass
class PointLossConfig:
    """P2PNet matching and loss (crowdseg/losses/p2p.py)."""
    cost_class: float = 1.0
    cost_point: float = 0.05
    eos_coef: float = 0.5
    point_loss_coef: float = 2e-4
    score_threshold: float = 0.5


@dataclass
class DensityConfig:
    """The density-map counter, `method: density` (crowdseg/models/density.py, losses/density.py)."""
    channels: list[int] = field(default_factory=lambda: [512, 512, 512, 256, 128, 64])  # CSRNet back-end
    activation: str = "softplus"      # softplus | relu: keeps the density >= 0
    sigma: float = 4.0                # Gaussian of the target density (pixels); the target sums to the count


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


@dataclass
class OptimConfig:
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = 0.1
    step_size: int = 3500             # StepLR step in epochs
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer` (only these keys)."""
    max_epochs: int = 10
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    limit_test_batches: Optional[float] = None
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class WandbConfig:
    mode: str = "disabled"            # online | offline | disabled
    project: str = "crowdseg"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    num_pictures: int = 4             # prediction overlays saved per validation


@dataclass
class RpsConfig:
    """Reinforced Point Selection with GRPO, `method: rps` (crowdseg/lit/rps.py, crowdseg/rl/, METHODS.md D2).

    The proposer is the `model:` point predictor; SAM comes from `sam:`; NNEC radii, negative prompts,
    decode windows, the overlap rule and tiling follow `dpmo:` (masks are cut the way DPMO cuts them).
    The scorer's optimizer uses `rps.lr` and the `optim:` weight decay, gradient clip and StepLR.
    """
    proposer_ckpt: Optional[str] = None  # p2p checkpoint whose `model.*` weights initialise the proposer
    train_proposer: bool = False      # False: proposer frozen; True: also trained, with the P2P loss (`loss:`)
    proposer_steps: int = 0           # first training batches that train only the proposer (needs train_proposer)
    train_points: str = "matched"     # matched: the proposal Hungarian-matched to each GT point | predicted: score > threshold
    num_candidates: int = 8           # K candidates per point (index 0 = the point itself)
    sigma: float = 0.5                # candidate spread, in NNEC radii
    group_size: int = 8               # G actions sampled per group from pi_old (with replacement)
    clip_eps: float = 0.2             # PPO ratio clip epsilon
    beta: float = 0.04                # KL(pi || pi_ref) weight (k3 estimator)
    ppo_epochs: int = 1               # policy updates per rollout (1: pi_old = pi_theta, ratio 1)
    warmup_steps: int = 0             # rollouts that regress candidate IoU before GRPO (reference = the result)
    warmup_loss: str = "bce"          # bce | mse
    grpo: bool = True                 # False: the control, no GRPO phase
    lr: float = 1e-3                  # scorer learning rate
    scorer_channels: int = 128
    scorer_layers: int = 2
    selection: str = "iou"            # SAM multimask pick: iou (predicted IoU) | iou_inside | disc_iou
    unmatched_reward: float = 0.0     # reward of every candidate of a point matching no GT instance
    distance_weight: float = 0.0      # optional penalty weight * min(|c - p_gt| / r, 1)


@dataclass
class SamConfig:
    """SAM backend (crowdseg/sam)."""
    model_type: str = "tiny"          # vit_b | vit_l | vit_h | vit_t | tiny
    checkpoint: Optional[str] = None  # local checkpoint path; None only for `tiny`/random tests
    prompt_chunk: int = 128
    seed: int = 0                     # init seed of a model without checkpoint (`tiny`, benchmarks)


@dataclass
class DpmoConfig:
    """Point-to-mask generation, `crowdseg masks` (crowdseg/dpmo; the choices are in docs/dpmo.md)."""
    variant: str = "dpmo"             # dpmo | edp_sam (adds the exclusion-circle mask prompt)
    split: str = "train"              # dataset split to annotate
    out_dir: Optional[str] = None     # default: <runs_root>/<name>/masks/<split>
    radius_factor: float = 1.0        # NNEC radius = factor * nearest-neighbour distance (0.5: disjoint)
    r_min: float = 3.0                # radius clamp, pixels
    r_max: Optional[float] = None     # None: min(H, W) / 2
    lone_radius: Optional[float] = None  # radius of a point with no neighbour; None: min(H, W) / 4
    num_negatives: int = 3            # k nearest neighbours prompted as negative points
    box_prompt: bool = False          # add the circle's bounding box as a box prompt
    multimask: bool = True            # 3 candidates per prompt, picked by `selection`
    selection: str = "iou_inside"     # iou_inside (predicted IoU x fraction in circle) | disc_iou
    overlap: str = "logit"            # pixel claimed twice goes to: logit (highest) | nearest (centre)
    mask_threshold: float = 0.0       # SAM logit threshold
    context_factor: float = 2.0       # decoded window half-size, in circle radii
    fallback_radius_factor: float = 0.5  # empty instance -> disc of this times its radius
    edp_dense_prompt: str = "selected"   # edp_sam mask prompt: selected (refine pass) | disc (one pass)
    dense_prompt_logit: float = 8.0   # magnitude of the edp_sam mask prompt logits
    tile: bool = True                 # tile dense / large images (else one resize to the SAM input)
    target_nn_px: float = 24.0        # tile so the median NN distance spans this many SAM-input pixels
    max_scale: float = 4.0            # largest upsampling of an image for tiling
    tile_overlap: Optional[int] = None  # context around a tile core, pixels; None: 95th pct radius + 1
    overlays: bool = False            # also write overlays/<stem>.jpg (masks and points)


@dataclass
class ExperimentConfig:
    name: str = MISSING               # experiment name (defaults to the YAML file's stem)
    method: str = "p2p"               # p2p | rps | xmask | boxinst | dpmo
    seed: int = 0
    runs_root: str = "runs"
    run_name: Optional[str] = None    # default: derived from method, dataset, label fraction, seed
    resume: bool = True               # `fit` continues from checkpoints/last.ckpt when present
    ckpt_path: Optional[str] = None   # weights for validate/test/predict (default: the run's last.ckpt)
    checkpoint_every_n_steps: int = 50  # last.ckpt is also written every this many training steps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: PointLossConfig = field(default_factory=PointLossConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    mask_loss: MaskLossConfig = field(default_factory=MaskLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    dpmo: DpmoConfig = field(default_factory=DpmoConfig)
    rps: RpsConfig = field(default_factory=RpsConfig)
