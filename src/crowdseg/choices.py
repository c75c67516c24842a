"""The named choices of config keys, and the `dpmo` section's check: a leaf module without torch.

The code that acts on a choice (a loss, a Lightning module, DPMO, SAM) and the load-time check of
its config key (`crowdseg.methods`) both take the tuple from here, so loading a config imports
neither torch nor Lightning (`crowdseg.methods.base`). Like `crowdseg.errors`, it imports nothing
of the project but the errors, so any module may import it.
"""
from __future__ import annotations

from typing import Any

from crowdseg.errors import ConfigError

# loss.*: crowdseg.losses.p2p
CLS_LOSSES = ("ce", "focal")
MATCH_ON = ("predicted", "anchors")
# mask_loss.points: crowdseg.lit.p2p
MASK_POINTS = ("predicted", "anchors")
# rps.train_points: crowdseg.lit.rps
TRAIN_POINTS = ("matched", "predicted")
# sam.model_type: crowdseg.sam.build (SAM's three, MobileSAM's vit_t, a tiny random test model)
MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "vit_t", "tiny")
# dpmo.*: crowdseg.dpmo
VARIANTS = ("dpmo", "edp_sam")
SELECTIONS = ("iou_inside", "disc_iou")
OVERLAPS = ("logit", "nearest")
EDP_DENSE_PROMPTS = ("selected", "disc")
# rps.selection (crowdseg.rl.sam_env): "iou" is SAM's own predicted IoU (the RPS default); the
# others use the NNEC circle (crowdseg.dpmo.select)
PROMPT_SELECTIONS = ("iou",) + SELECTIONS


def check_dpmo_config(cfg: Any) -> None:
    """Raise ConfigError naming the first invalid `dpmo.*` key."""
    choices = {"variant": VARIANTS, "selection": SELECTIONS, "overlap": OVERLAPS,
               "edp_dense_prompt": EDP_DENSE_PROMPTS}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"key 'dpmo.{key}': {getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in ("radius_factor", "r_min", "context_factor", "target_nn_px", "max_scale", "dense_prompt_logit"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"key 'dpmo.{key}': must be > 0, got {getattr(cfg, key)!r}")
    if cfg.r_max is not None and cfg.r_max < cfg.r_min:
        raise ConfigError(f"key 'dpmo.r_max': {cfg.r_max} is smaller than dpmo.r_min {cfg.r_min}")
    if cfg.num_negatives < 0 or cfg.fallback_radius_factor < 0 or (cfg.tile_overlap is not None and cfg.tile_overlap < 0):
        raise ConfigError("keys 'dpmo.num_negatives', 'dpmo.fallback_radius_factor', 'dpmo.tile_overlap' must be >= 0")
