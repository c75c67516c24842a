"""LightningModule of Reinforced Point Selection (RPS) trained with GRPO (METHODS.md A1, D1, D2).

Orchestration only; the math lives in `crowdseg.rl` (candidates, policy, grpo, reward) and the SAM
environment in `crowdseg.rl.sam_env`.

**Training** (manual optimisation). With a trained proposer (`proposer_criterion`), the first
`proposer_steps` batches train only the proposer (P2P loss, no SAM): cheap steps that give RPS
points worth refining when no proposer checkpoint exists. Every later batch is one *rollout*:
1. The proposer (a `PointPredictor`, frozen by default) gives the points of each image:
   - ``train_points="matched"`` (default): for every GT person, the proposal the P2P Hungarian
     matcher assigns to it (`hungarian_match`, whatever its score). Every person yields one group,
     and each point is what the proposer predicts for that person, so groups are never wasted on
     background predictions even with a weak proposer.
   - ``"predicted"``: the proposals scoring above `score_threshold`, exactly the inference points.
2. Per image: NNEC radii of those points, K candidates per point (`sample_candidates`), the GT
   instance of each point (`match_points_to_instances`), and the reward of every candidate
   (`SamEnvironment.rewards`: SAM prompted at the candidate, clipped to its NNEC disc, IoU with the
   matched GT mask; unmatched points get `unmatched_reward` and are dropped as zero-variance groups).
3. Warm-up rollouts (the first `warmup_steps`): one update of `iou_regression_loss` on all K
   candidates. When the GRPO phase starts after a warm-up, the reference becomes a copy of the
   warmed-up scorer (the "SFT" policy of METHODS.md D2).
4. GRPO rollouts (when `grpo`): G actions per group from pi_old (the scorer at rollout time),
   group-normalised advantages, then `ppo_epochs` updates of the clipped objective with the k3 KL
   to the frozen reference. Each update: `manual_backward`, `clip_gradients` (norm), optimizer step.
The scorer reads the proposer's stride-8 features, detached. With `proposer_criterion` the proposer
is trained too (P2P loss, its own optimizer, stepped once per rollout); every backward touches all
trainable parameters (zero-weight terms where unused), so DDP's reducer always sees the same set.

Counters (saved in the checkpoint, `on_save_checkpoint`): ``batches`` (training batches),
``rollouts`` (batches with a rollout), ``policy_updates`` (GRPO optimizer steps of the scorer),
``warmup_updates``. Lightning's ``global_step`` counts
optimizer steps of every optimizer, so it is not the number of policy updates. Candidates and
actions come from a CPU generator seeded by (seed, rollouts, rank): a resumed run draws exactly
what the uninterrupted run would have drawn.

Optimizers (`crowdseg.optim.build_optimizer`): the scorer's Adam (group "scorer", `rps.lr`) and, with a
trained proposer, the proposer's (groups "heads" `optim.lr` and "backbone" `optim.backbone_lr`), each
with the `optim.schedule` scheduler. Manual optimisation steps them by hand: an epoch-interval one
(step) at the end of each epoch once its optimizer has stepped, a step-interval one (cosine) before
each update of its optimizer, to trainer.global_step (`_schedule_to_global_step`).

Logged: ``train/reward_mean`` and ``train/reward_std`` (mean and mean within-group std of the
sampled actions' rewards, matched groups), ``train/reward_selected`` (reward of the greedy choice
of pi_old) and ``train/reward_original`` (of the point itself), ``train/clip_fraction``,
``train/kl``, ``train/ratio``, ``train/loss``, ``train/valid_groups``, ``train/proposer_loss``,
``train/phase`` (0 proposer only, 1 warm-up, 2 GRPO) and the counters.

**Inference**: proposer points (score > threshold) -> K candidates (seeded per image name) -> the
scorer's argmax per group (the point itself when the scorer was never trained: `grpo` false and no
warm-up) -> SAM masks with NNEC and overlap resolution -> instance id map. Both the selected and the
original points are scored: ``<stage>/mae``, ``rmse``, ``mse``, ``nae`` (counts are the same for
both), ``<stage>/sigma_{s,l}_{precision,recall,f1}`` (radii 4 / 8 px), ``<stage>/iou_c`` (Mean IoU_C),
``<stage>/mask_ap*`` (COCO mask AP), ``<stage>/point_iou`` (mean IoU of each GT-matched point's
own mask, before overlap resolution: the quantity the reward measures), each also with the suffix
``_original``; and ``<stage>/shift`` (mean distance from each point to its selected candidate, in
NNEC radii) with its signed parts ``shift_x``, ``shift_y`` (y grows downwards). Written to
``<run_dir>/metrics/<stage>.json`` on rank 0.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from crowdseg.config.schema import OptimConfig
from crowdseg.errors import DataError
from crowdseg.lit.common import StageHooks, inside_image, write_stage_metrics
from crowdseg.losses.p2p import P2PLoss, hungarian_match
from crowdseg.metrics.torch_metrics import CountingMetrics, InstanceIoU, LocalizationMetrics, MaskAP
from crowdseg.models.p2p import PointPredictor, select_points
from crowdseg.optim import build_optimizer, heads_and_backbone, heads_and_backbone_rates
from crowdseg.rl.candidates import sample_candidates
from crowdseg.rl.grpo import group_advantages, grpo_loss, iou_regression_loss
from crowdseg.rl.policy import CandidateScorer, frozen_copy, greedy, log_prob, sample
from crowdseg.rl.reward import match_points_to_instances
from crowdseg.rl.sam_env import SamEnvironment
from crowdseg.vis import point_overlay, save_png

if TYPE_CHECKING:  # pragma: no cover
    from crowdseg.methods.rps import RpsConfig

LOCALIZATION_RADII = (4.0, 8.0)
STAGES = ("val", "test")


@dataclass
class Rollout:
    """The groups of one training batch, concatenated over its images (N groups of K candidates)."""
    points: Tensor          # (N, 2)
    radii: Tensor           # (N,)
    candidates: Tensor      # (N, K, 2)
    batch_index: Tensor     # (N,) long: image of each group
    matched: Tensor         # (N,) long: GT index or -1
    rewards: Tensor         # (N, K) float in [0, 1]


def _touch(parameters: Sequence[nn.Parameter]) -> Tensor:
    """A zero that depends on every parameter: keeps DDP's reducer fed when a part sits out an update."""
    return sum((p.sum() * 0.0 for p in parameters), torch.zeros(()))


class RPSModule(StageHooks, L.LightningModule):
    """RPS: a point proposer, a candidate scorer trained with GRPO, a frozen reference, a SAM environment.

    settings: the `rps` config section; score_threshold: the proposer's (`loss.score_threshold`);
    seed: the run's, for the candidates and actions; optim, total_steps: the `optim` section and
    trainer.max_steps (the schedule's budget).
    """

    monitor = ("val/iou_c", "max")

    def __init__(self, proposer: PointPredictor, scorer: CandidateScorer, environment: SamEnvironment,
                 settings: "RpsConfig", score_threshold: float, seed: int, optim: OptimConfig, total_steps: int,
                 proposer_criterion: Optional[P2PLoss] = None, run_dir: Optional[Path] = None, num_pictures: int = 4):
        super().__init__()
        self.automatic_optimization = False
        self.proposer, self.scorer = proposer, scorer
        self.reference = frozen_copy(scorer)
        self.environment = environment          # a plain object: SAM stays out of the state dict
        environment.predictor.model.requires_grad_(False)
        self.settings, self.score_threshold, self.seed = settings, score_threshold, seed
        self.optim, self.total_steps = optim, total_steps
        self.proposer_criterion = proposer_criterion
        self.train_proposer = proposer_criterion is not None
        if not self.train_proposer:
            proposer.requires_grad_(False).eval()   # Lightning keeps each submodule's mode as it finds it
        self.run_dir, self.num_pictures = run_dir, num_pictures
        self.counters = {"batches": 0, "rollouts": 0, "policy_updates": 0, "warmup_updates": 0}
        if settings.proposer_steps and not self.train_proposer:
            raise ValueError("proposer_steps > 0 needs a trained proposer (a proposer_criterion)")
        self.metrics = nn.ModuleDict({stage: self._stage_metrics() for stage in STAGES})

    @staticmethod
    def _stage_metrics() -> nn.ModuleDict:
        metrics = {"counting": CountingMetrics(), "shift": MeanMetric(), "shift_x": MeanMetric(), "shift_y": MeanMetric()}
        for suffix in ("", "_original"):
            metrics["localization" + suffix] = LocalizationMetrics(fixed_radii=LOCALIZATION_RADII)
            metrics["iou" + suffix] = InstanceIoU()
            metrics["mask_ap" + suffix] = MaskAP()
            metrics["point_iou" + suffix] = MeanMetric()
        return nn.ModuleDict(metrics)

    # ------------------------------------------------------------------------------ housekeeping
    def train(self, mode: bool = True) -> "RPSModule":
        super().train(mode)
        if not self.train_proposer:
            self.proposer.eval()        # frozen: batch-norm statistics stay those of the checkpoint
        self.reference.eval()
        return self

    def _sam_to_device(self) -> None:
        self.environment.predictor.model.to(self.device)

    def on_fit_start(self) -> None:
        self._sam_to_device()

    def on_validation_start(self) -> None:
        self._sam_to_device()

    def on_test_start(self) -> None:
        self._sam_to_device()

    def on_predict_start(self) -> None:
        self._sam_to_device()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rps_counters"] = dict(self.counters)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the reference and the scorer come back with the state dict; the counters from here
        self.counters.update(checkpoint.get("rps_counters", {}))

    def _generator(self, *key: int) -> torch.Generator:
        seed = zlib.crc32(np.asarray((self.seed,) + key, dtype=np.int64).tobytes())
        return torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------------------------- rollout
    def training_points(self, outputs: dict[str, Tensor], gt_points: list[Tensor],
                        image_size: Tensor) -> list[Tensor]:
        """The points of each image that form the groups (see the module docstring)."""
        result = []
        prob = outputs["logits"].detach().softmax(-1)[..., 1]
        for b, (h, w) in enumerate(image_size.tolist()):
            proposals = outputs["points"][b].detach()
            if self.settings.train_points == "matched":
                pred_idx, _ = hungarian_match(proposals, prob[b], gt_points[b].to(proposals.device))
                points = proposals[pred_idx]
            else:
                keep = (prob[b] > self.score_threshold) & inside_image(proposals, h, w)
                points = proposals[keep]
            limits = points.new_tensor([w - 1, h - 1])
            result.append(torch.minimum(points.clamp_min(0.0), limits).float())
        return result

    def rollout(self, batch: dict[str, Any], outputs: dict[str, Tensor], generator: torch.Generator) -> Rollout:
        """Candidates and SAM rewards of every training point of the batch."""
        maps = batch.get("instance_map")
        if maps is None:
            raise DataError("RPS rewards need an instance mask for every training image (the synthetic crowd's "
                            "own, or DPMO masks from `crowdseg masks`); this batch has an image without one")
        s, env = self.settings, self.environment
        points_per_image = self.training_points(outputs, batch["points"], batch["image_size"])
        parts: list[tuple[Tensor, ...]] = []
        for b, ((h, w), points) in enumerate(zip(batch["image_size"].tolist(), points_per_image)):
            gt_points, instance_map = batch["points"][b].to(self.device), maps[b].to(self.device)
            scene = env.prepare(batch["image"][b, :, :h, :w], points)
            radii = torch.from_numpy(scene.radii).float().to(self.device)
            candidates = sample_candidates(points, radii, s.num_candidates, s.sigma, (h, w), generator)
            matched = match_points_to_instances(points, gt_points, radii, instance_map)
            rewards = env.rewards(scene, candidates, matched, instance_map, s.unmatched_reward,
                                  s.distance_weight, gt_points).to(self.device)
            index = torch.full((len(points),), b, dtype=torch.long, device=self.device)
            parts.append((points, radii, candidates, index, matched, rewards))
        return Rollout(*(torch.cat(column) for column in zip(*parts)))

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        s = self.settings
        with torch.set_grad_enabled(self.train_proposer):
            outputs = self.proposer(batch["image"])
        proposer_loss = None
        if self.train_proposer:
            proposer_loss = self.proposer_criterion(outputs, [p.to(self.device) for p in batch["points"]])["loss"]
        if self.counters["batches"] < s.proposer_steps:          # the proposer alone, no rollout
            self._update(None, proposer_loss, step_scorer=False)
            logs = {"phase": torch.tensor(0.0)}
        else:
            logs = self._rps_step(batch, outputs, proposer_loss)
        self.counters["batches"] += 1
        if proposer_loss is not None:
            logs["proposer_loss"] = proposer_loss.detach()
        logs.update({k: torch.tensor(float(v)) for k, v in self.counters.items()})
        self.log_dict({f"train/{k}": v.float().to(self.device) for k, v in logs.items()},
                      batch_size=len(batch["points"]))

    def _rps_step(self, batch: dict[str, Any], outputs: dict[str, Tensor], proposer_loss: Optional[Tensor]
                  ) -> dict[str, Tensor]:
        """One rollout and its scorer updates (warm-up or GRPO); see the module docstring."""
        s = self.settings
        generator = self._generator(self.counters["rollouts"], self.global_rank)
        features = outputs["features"].detach()
        with torch.no_grad():
            ro = self.rollout(batch, outputs, generator)
        warm = self.counters["rollouts"] < s.warmup_steps
        if not warm and s.warmup_steps > 0 and self.counters["rollouts"] == s.warmup_steps:
            self.reference.load_state_dict(self.scorer.state_dict())   # GRPO starts from the warmed-up scorer
        matched = ro.matched >= 0
        n = len(ro.points)

        def scores(net: nn.Module) -> Tensor:
            if n == 0:
                return ro.rewards.new_zeros((0, s.num_candidates))
            return net(features, ro.candidates, ro.points, ro.radii, ro.batch_index)

        logs: dict[str, Tensor] = {"phase": torch.tensor(1.0 if warm else 2.0)}
        with torch.no_grad():
            old_logits = scores(self.scorer)
        pick = greedy(old_logits)
        logs["reward_selected"] = _masked_mean(ro.rewards.gather(1, pick[:, None])[:, 0], matched)
        logs["reward_original"] = _masked_mean(ro.rewards[:, 0], matched)

        if warm:
            loss = iou_regression_loss(scores(self.scorer), ro.rewards, s.warmup_loss, valid=matched) if n else None
            self._update(loss, proposer_loss, step_scorer=True)
            self.counters["warmup_updates"] += 1
            logs["loss"] = loss.detach() if loss is not None else torch.tensor(0.0)
        elif s.grpo:
            actions = sample(old_logits, s.group_size, generator)
            sampled_rewards = ro.rewards.gather(1, actions)
            advantages, valid = group_advantages(sampled_rewards)
            valid = valid & matched
            with torch.no_grad():
                old_logp = log_prob(old_logits, actions)
                ref_logp = log_prob(scores(self.reference), actions)
            diagnostics = []
            for epoch in range(s.ppo_epochs):
                loss, diag = (grpo_loss(log_prob(scores(self.scorer), actions), old_logp, advantages, valid, ref_logp,
                                        s.clip_eps, s.beta) if n else (None, None))
                self._update(loss, proposer_loss if epoch == 0 else None, step_scorer=True,
                             step_proposer=epoch == 0)
                self.counters["policy_updates"] += 1
                if diag is not None:
                    diagnostics.append(diag)
            logs.update(reward_mean=_masked_mean(sampled_rewards.mean(1), matched),
                        reward_std=_masked_mean(sampled_rewards.std(1, correction=0), matched),
                        valid_groups=valid.float().sum())
            if diagnostics:
                for key in ("clip_fraction", "kl", "ratio"):
                    logs[key] = torch.stack([d[key] for d in diagnostics]).mean()
                logs["loss"] = loss.detach()
        elif self.train_proposer:                               # the control: only the proposer learns
            self._update(None, proposer_loss, step_scorer=False)
        self.counters["rollouts"] += 1
        return logs

    def _update(self, scorer_loss: Optional[Tensor], proposer_loss: Optional[Tensor], step_scorer: bool,
                step_proposer: bool = True) -> None:
        """One backward of (scorer loss + proposer loss), gradient clipping by norm, optimizer steps.

        A missing loss becomes a zero that touches the part's parameters, so every backward reaches
        every trainable parameter (DDP's reducer expects that). An optimizer only steps when asked.
        """
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        scorer_opt = optimizers[0]
        proposer_opt = optimizers[1] if self.train_proposer else None
        total = scorer_loss if scorer_loss is not None else _touch(list(self.scorer.parameters())).to(self.device)
        if proposer_opt is not None:
            total = total + (proposer_loss if proposer_loss is not None and step_proposer
                             else _touch(list(self.proposer.parameters())).to(self.device))
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(total)
        clip = self.optim.grad_clip
        for optimizer, step in ((scorer_opt, step_scorer), (proposer_opt, step_proposer)):
            if optimizer is None or not step:
                continue
            self._schedule_to_global_step(optimizer.optimizer)
            if clip:
                self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            optimizer.step()

    def _schedule_to_global_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Before `optimizer` updates, step its step-interval scheduler (a cosine) until it has taken
        trainer.global_step steps: the update then uses factor(global_step), the run's count of
        optimizer steps (of every optimizer), as under automatic optimisation, and a cosine over
        trainer.max_steps ends with the run. (A scorer that waited for its first update, while the
        proposer trained alone, jumps ahead: torch's warning about that is expected and silenced.)"""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != "step" or config.scheduler.optimizer is not optimizer:
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                while config.scheduler.last_epoch < self.global_step:
                    config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        for config in self.trainer.lr_scheduler_configs:   # step: StepLR, once per epoch
            if config.interval == "epoch" and config.scheduler.optimizer.state:   # skip one that never stepped
                config.scheduler.step()

    def configure_optimizers(self):
        o = self.optim
        configs = [build_optimizer({"scorer": self.scorer.parameters()}, {"scorer": self.settings.lr}, o,
                                   self.total_steps)]
        if self.train_proposer:
            configs.append(build_optimizer(heads_and_backbone(self.proposer, self.proposer.backbone),
                                           heads_and_backbone_rates(o), o, self.total_steps))
        return configs

    # -------------------------------------------------------------------------------- inference
    def proposals(self, batch: dict[str, Any]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Per image the proposer's points (score > threshold, inside the image) and scores; the features."""
        outputs = self.proposer(batch["image"])
        selected = select_points(outputs["points"], outputs["logits"], self.score_threshold)
        result = []
        for (points, scores), (h, w) in zip(selected, batch["image_size"].tolist()):
            keep = inside_image(points, h, w)
            result.append((points[keep].float(), scores[keep]))
        return result, outputs["features"]

    def select(self, features: Tensor, points: Tensor, radii: Tensor, image_hw: tuple[int, int],
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The chosen prompt of each point: (N, 2) selected xy and (N, K, 2) candidates of one image.

        features: (1, C, h, w) of the image; points: (N, 2); radii: (N,).
        """
        s = self.settings
        candidates = sample_candidates(points, radii, s.num_candidates, s.sigma, image_hw, generator)
        if not s.uses_scorer or len(points) == 0:
            return candidates[:, 0], candidates
        choice = greedy(self.scorer(features, candidates, points, radii))
        return candidates[torch.arange(len(points), device=candidates.device), choice], candidates

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any], original: bool = True) -> list[dict[str, Any]]:
        """Per image: points, scores, selected points, and the instance maps of selected (and original) points."""
        predictions, features = self.proposals(batch)
        out = []
        for b, ((points, scores), (h, w)) in enumerate(zip(predictions, batch["image_size"].tolist())):
            name = str(batch["meta"][b].get("name", b)) if batch.get("meta") else str(b)
            scene = self.environment.prepare(batch["image"][b, :, :h, :w], points)
            radii = torch.from_numpy(scene.radii).float().to(points.device)
            selected, _ = self.select(features[b:b + 1], points, radii, (h, w),
                                      self._generator(zlib.crc32(name.encode())))
            item = {"name": name, "points": points, "scores": scores, "selected": selected, "scene": scene,
                    "instance_map": self.environment.instance_map(scene, selected)[0]}
            if original:
                item["instance_map_original"] = self.environment.instance_map(scene)[0]
            out.append(item)
        return out

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        items = self.predict_batch(batch)
        m = self.metrics[stage]
        gt_points = [p.to(self.device) for p in batch["points"]]
        pred_counts = torch.tensor([len(i["points"]) for i in items], dtype=torch.float, device=self.device)
        gt_counts = torch.tensor([len(p) for p in gt_points], dtype=torch.float, device=self.device)
        m["counting"].update(pred_counts, gt_counts)
        maps = batch.get("instance_map")
        for suffix, key, map_key in (("", "selected", "instance_map"), ("_original", "points", "instance_map_original")):
            m["localization" + suffix].update([i[key] for i in items], gt_points)
            if maps is None:
                continue
            gts = [g.cpu().numpy() for g in maps]
            m["iou" + suffix].update([i[map_key] for i in items], gts)
            m["mask_ap" + suffix].update([{"instance_map": i[map_key], "scores": i["scores"].cpu()} for i in items],
                                         [{"instance_map": g} for g in gts])
        for item in items:
            if len(item["points"]):
                radii = torch.from_numpy(item["scene"].radii).float().to(self.device)
                offset = (item["selected"] - item["points"]) / radii[:, None]
                m["shift"].update(offset.norm(dim=1))
                m["shift_x"].update(offset[:, 0])
                m["shift_y"].update(offset[:, 1])
        if maps is not None:
            for item, gt, gt_map in zip(items, gt_points, maps):
                self._update_point_iou(m, item, gt, gt_map.to(self.device))
        self._save_pictures(stage, batch, batch_idx, items)

    def _update_point_iou(self, m: nn.ModuleDict, item: dict[str, Any], gt_points: Tensor, gt_map: Tensor) -> None:
        """Mean IoU of each GT-matched point's own NNEC-clipped mask, selected vs. original prompt."""
        points, scene = item["points"], item["scene"]
        if len(points) == 0:
            return
        radii = torch.from_numpy(scene.radii).float().to(points.device)
        matched = match_points_to_instances(points, gt_points, radii, gt_map)
        both = torch.stack([item["selected"], points], 1)                      # (N, 2, 2)
        rewards = self.environment.rewards(scene, both, matched, gt_map).to(self.device)
        keep = matched >= 0
        if keep.any():
            m["point_iou"].update(rewards[keep, 0])
            m["point_iou_original"].update(rewards[keep, 1])

    def _end_stage(self, stage: str) -> dict[str, float]:
        values: dict[str, float] = {}
        m = self.metrics[stage]
        values.update(_compute(m["counting"]))
        for key in ("shift", "shift_x", "shift_y"):
            if m[key].update_count:
                values[key] = float(m[key].compute())
        for suffix in ("", "_original"):
            values.update({k + suffix: v for k, v in _compute(m["localization" + suffix]).items()
                           if "level" not in k})
            iou = _compute(m["iou" + suffix])
            if iou["gt_instances"] > 0:
                values.update({"iou_c" + suffix: iou["mean_iou_c"], "gt_instances": iou["gt_instances"],
                               "pred_instances": iou["pred_instances"]})
                values.update({k + suffix: v for k, v in _compute(m["mask_ap" + suffix]).items()})
            if m["point_iou" + suffix].update_count:
                values["point_iou" + suffix] = float(m["point_iou" + suffix].compute())
        for metric in m.values():
            metric.reset()
        logged = {f"{stage}/{k}": v for k, v in values.items()}
        self.log_dict(logged, sync_dist=False)         # the metrics synchronise themselves
        write_stage_metrics(self, stage, logged, self.run_dir)
        return logged

    def predict_step(self, batch, batch_idx):
        return [{"name": i["name"], "points": i["selected"].cpu(), "original_points": i["points"].cpu(),
                 "scores": i["scores"].cpu(), "instance_map": i["instance_map"]}
                for i in self.predict_batch(batch, original=False)]

    def _save_pictures(self, stage: str, batch, batch_idx: int, items) -> None:
        if self.run_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        first = batch_idx * len(items)
        for b, item in enumerate(items):
            if first + b >= self.num_pictures:
                return
            h, w = batch["image_size"][b].tolist()
            picture = point_overlay(batch["image"][b, :, :h, :w], batch["points"][b], item["selected"],
                                    torch.from_numpy(item["instance_map"].astype(np.int64)))
            save_png(Path(self.run_dir) / "pictures" / f"{stage}_{first + b:02d}.png", picture)


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    return values[keep].float().mean() if bool(keep.any()) else values.new_zeros((), dtype=torch.float32)


def _compute(metric) -> dict[str, float]:
    result = metric.compute()
    return {k: float(v) for k, v in result.items()}
