"""`method: rps`: Reinforced Point Selection (METHODS.md D2): a point predictor (the proposer, `model` /
`loss` as in `method: p2p`) whose points a scorer refines into SAM prompts, trained with GRPO; SAM
comes from `sam`, and masks are cut the way DPMO cuts them (`dpmo`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from crowdseg.choices import PROMPT_SELECTIONS, TRAIN_POINTS, check_dpmo_config
from crowdseg.errors import ConfigError
from crowdseg.methods.base import Job, Method
from crowdseg.methods.dpmo import DpmoConfig, SamConfig, check_sam
from crowdseg.methods.p2p import PointLossConfig, PointModelConfig, build_point_loss, build_point_predictor, check_point_model

WARMUP_LOSSES = ("bce", "mse")


@dataclass
class RpsConfig:
    """Reinforced Point Selection with GRPO, `method: rps` (crowdseg/lit/rps.py, crowdseg/rl/, METHODS.md D2).

    The proposer is the `model:` point predictor; SAM comes from `sam:`; NNEC radii, negative prompts,
    decode windows, the overlap rule and tiling follow `dpmo:` (masks are cut the way DPMO cuts them).
    The scorer's optimizer uses `rps.lr` and the `optim:` weight decay, gradient clip and schedule.
    This section is the settings object `RPSModule` receives (checked at load time by `check`).
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

    @property
    def uses_scorer(self) -> bool:
        """Whether inference selects with the scorer (it is trained by GRPO or by the warm-up)."""
        return self.grpo or self.warmup_steps > 0


def check(cfg: DictConfig) -> None:
    r = cfg.rps
    for key, allowed in (("train_points", TRAIN_POINTS), ("selection", PROMPT_SELECTIONS), ("warmup_loss", WARMUP_LOSSES)):
        if r[key] not in allowed:
            raise ConfigError(f"key 'rps.{key}': {r[key]!r} is not one of {', '.join(allowed)}")
    for key in ("num_candidates", "group_size", "ppo_epochs", "scorer_channels", "scorer_layers"):
        if r[key] < 1:
            raise ConfigError(f"key 'rps.{key}': must be >= 1, got {r[key]}")
    if r.proposer_steps > 0 and not r.train_proposer:
        raise ConfigError(f"key 'rps.proposer_steps': {r.proposer_steps} steps of proposer training need "
                          f"rps.train_proposer=true")
    for key in ("sigma", "beta", "warmup_steps", "distance_weight", "proposer_steps"):
        if r[key] < 0:
            raise ConfigError(f"key 'rps.{key}': must be >= 0, got {r[key]}")
    for key in ("clip_eps", "lr"):
        if not r[key] > 0:
            raise ConfigError(f"key 'rps.{key}': must be > 0, got {r[key]}")
    check_point_model(cfg.model, cfg.loss)
    check_sam(cfg.sam)
    check_dpmo_config(cfg.dpmo)


def build(cfg: DictConfig, run_dir: Path, split=None) -> Job:
    from crowdseg.data import build_datamodule
    from crowdseg.lit.rps import CandidateScorer, RPSModule
    from crowdseg.mask_supervision import mask_coverage
    from crowdseg.methods.weights import load_weights
    from crowdseg.models.p2p import PointPredictor
    from crowdseg.rl.sam_env import EnvOptions, SamEnvironment
    from crowdseg.sam.build import build_sam_from_config
    from crowdseg.sam.predictor import BatchedSamPredictor

    r, lo, d = cfg.rps, cfg.loss, cfg.dpmo
    datamodule = build_datamodule(cfg, split)
    if mask_coverage(datamodule.datasets["train"]).state == "none":
        raise ConfigError(f"method 'rps': the training images of data.name={cfg.data.name!r} carry no instance "
                          f"masks, and the reward needs them; generate DPMO masks (`crowdseg masks`) and point "
                          f"the data config at them")
    proposer = build_point_predictor(cfg.model)
    if r.proposer_ckpt:
        # a p2p run's checkpoint holds the predictor under `model.`, an RPS run's under `proposer.`
        load_weights(proposer, r.proposer_ckpt, "rps.proposer_ckpt", prefixes=("model.", "proposer."),
                     hint="train the proposer first: `crowdseg fit experiments/p2p/<dataset>.yaml`")
    scorer = CandidateScorer(cfg.model.fpn_channels, PointPredictor.stride, r.scorer_channels, r.scorer_layers)
    options = EnvOptions(radius_factor=d.radius_factor, r_min=d.r_min, r_max=d.r_max, lone_radius=d.lone_radius,
                         num_negatives=d.num_negatives, box_prompt=d.box_prompt, multimask=d.multimask,
                         selection=r.selection, mask_threshold=d.mask_threshold, context_factor=d.context_factor,
                         overlap=d.overlap, fallback_radius_factor=d.fallback_radius_factor, tile=d.tile,
                         target_nn_px=d.target_nn_px, max_scale=d.max_scale, tile_overlap=d.tile_overlap)
    environment = SamEnvironment(BatchedSamPredictor(build_sam_from_config(cfg.sam), cfg.sam.prompt_chunk), options)
    criterion = build_point_loss(lo) if r.train_proposer else None
    module = RPSModule(proposer, scorer, environment, OmegaConf.to_object(r), lo.score_threshold, cfg.seed,
                       OmegaConf.to_object(cfg.optim), cfg.trainer.max_steps, criterion, run_dir, cfg.logger.num_pictures)
    return Job(module, datamodule)


METHOD = Method(name="rps", sections={"model": PointModelConfig, "loss": PointLossConfig, "rps": RpsConfig,
                                      "sam": SamConfig, "dpmo": DpmoConfig},
                build=build, check=check, summary="Reinforced Point Selection: GRPO-trained SAM prompts for a point predictor")
