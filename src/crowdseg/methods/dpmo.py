"""`method: dpmo`: point labels to instance masks with SAM and nearest-neighbour exclusive circles
(DPMO / EDP-SAM, METHODS.md A1, D1). It trains nothing: `crowdseg masks <experiment>` runs it. Its
`sam` and `dpmo` sections are shared with `method: rps`, whose reward cuts masks the same way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from crowdseg.choices import MODEL_TYPES, check_dpmo_config
from crowdseg.errors import ConfigError
from crowdseg.methods.base import Job, Method

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


def check_sam(sam: DictConfig) -> None:
    if sam.model_type not in MODEL_TYPES:
        raise ConfigError(f"key 'sam.model_type': {sam.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if sam.prompt_chunk < 1:
        raise ConfigError(f"key 'sam.prompt_chunk': must be >= 1, got {sam.prompt_chunk}")


def check(cfg: DictConfig) -> None:
    check_sam(cfg.sam)
    check_dpmo_config(cfg.dpmo)


def build(cfg: DictConfig, run_dir: Path, split=None) -> Job:
    raise ConfigError("method 'dpmo' trains nothing; run `crowdseg masks <experiment>` to write instance masks")


METHOD = Method(name="dpmo", sections={"sam": SamConfig, "dpmo": DpmoConfig}, build=build, check=check,
                summary="DPMO / EDP-SAM instance masks from points (`crowdseg masks`)", trains=False)
