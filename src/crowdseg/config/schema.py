"""Typed configuration schema: every key an experiment YAML may set, with its default.

Each section is a small dataclass; `ExperimentConfig` composes the shared ones and each method module
(`crowdseg/methods/<name>.py`) adds its own. OmegaConf merges experiment files and `key=value`
overrides onto this schema, so an unknown key, a wrong type or a missing
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
    train_list: Optional[str] = None  # name lists (one file name per line) that narrow the reader's
    val_list: Optional[str] = None    # train / val / test splits, e.g. a scene split; a val list of
    test_list: Optional[str] = None   # images of the training split carves them out of training
    val_fraction: float = 0.0        # percent of the training images carved out as the val set (fixed,
                                     # seeded by `val_seed`, out of the labeled and unlabeled pools);
                                     # > 0 replaces `val_split`, so model selection never sees test
    val_seed: int = 0                # seed of the val carve (independent of `seed` and `split_seed`)
    label_fraction: float = 100.0    # percent of the non-val training images that are labeled
    labeled_list: Optional[str] = None  # a published list of labeled images instead (XMask's protocols)
    split_seed: int = 0              # seed of the label-fraction split (independent of `seed`)
    on_bad_annotation: str = "fail"  # fail | skip (the image) | drop (only the bad points)
    on_duplicate_points: str = "drop"  # drop (counted in the report) | fail | keep: exact duplicate head
                                       # points; the test split always keeps them (published ground truth)
    cache_dir: Optional[str] = None  # preprocessing cache (resized images + labels); None reads the files
    masks_dir: Optional[str] = None  # instance-id maps `<image stem>.png|.npy` (e.g. from `crowdseg masks`);
                                     # "{split}" in the path becomes the split name (masks/{split})
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # training random scale
    hflip: float = 0.5               # training horizontal-flip probability
    photometric: str = "none"        # training colour jitter / blur: none | weak | strong
    reader_options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset reader
    sources: list[Any] = field(default_factory=list)  # name=union: several datasets as one, each a dict
                                     # {name, root, tag, split, splits, reader options} (datamodules/readers/union.py)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    """Rates, weight decay and schedule of every method (crowdseg/optim.py builds them)."""
    lr: float = 1e-4
    backbone_lr: Optional[float] = None  # None: lr x backbone_lr_scale, so changing `lr` moves both
    backbone_lr_scale: float = 0.1       # the backbone's rate relative to `lr` when backbone_lr is not set
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = 0.1
    step_size: int = 3500             # StepLR step in epochs (boxinst decays at boxinst.solver.milestones instead)
    gamma: float = 0.1
    schedule: str = "step"            # step: StepLR(step_size, gamma) per epoch (the papers') | cosine: per step,
                                      # to 0 at trainer.max_steps; every method
    warmup_steps: int = 0             # cosine only: linear warm-up steps
    ema_decay: Optional[float] = None  # e.g. 0.99: validate, select and checkpoint an EMA of the weights (warm-up)


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
    check_val_every_n_epoch: Optional[int] = 1  # null with an integer val_check_interval: validate every N steps
    val_check_interval: Any = None    # validation within / across epochs: a fraction of an epoch or N steps
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
class LabelsRecord:
    """What a run really trained on, written by the run (values given in a file are replaced)."""
    labeled_images: Optional[int] = None
    unlabeled_images: Optional[int] = None
    val_images: Optional[int] = None
    fraction: Optional[float] = None  # 100 * labeled / (labeled + unlabeled)
    source: Optional[str] = None      # how the labeled images were chosen
    labeled_sha256: Optional[str] = None  # of the labeled list file, or of the run's splits/labeled.txt
    sources: Optional[dict[str, Any]] = None  # data.name=union: images of each source by role


@dataclass
class ExperimentConfig:
    """The sections every method shares; a method's own sections are added by its module
    (`crowdseg.methods`), so a run's config holds only what applies to it."""
    name: str = MISSING               # experiment name (defaults to the YAML file's stem)
    method: str = "p2p"               # a name of crowdseg.methods.METHODS
    seed: int = 0
    runs_root: str = "runs"
    run_name: Optional[str] = None    # default: derived from method, dataset, label fraction, seed
    resume: bool = True               # `fit` continues from checkpoints/last.ckpt when present
    ckpt_path: Optional[str] = None   # weights for validate/test/predict (default: the run's best.ckpt, else last.ckpt)
    checkpoint_every_n_steps: int = 50  # last.ckpt is also written every this many training steps
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    labels: LabelsRecord = field(default_factory=LabelsRecord)
