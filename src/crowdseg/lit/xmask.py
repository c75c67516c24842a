"""LightningModule of XMask (`method: xmask`, METHODS.md A2): mean teacher, three phases, evaluation.

Orchestration only: the math is in losses/xmask.py, xmask/pseudo_masks.py and xmask/schedule.py.

Teacher. `self.teacher` is `torch.optim.swa_utils.AveragedModel(self.model,
multi_avg_fn=get_ema_multi_avg_fn(momentum))`: a copy of the student whose *parameters* are the
EMA t <- m t + (1 - m) s, updated after every optimizer step (`optimizer_step`). With
`teacher_buffers="copy"` (published) its buffers (BatchNorm running statistics) are copied from the
student at each update (statistics that include the strong views); with "ema" they are averaged like
the parameters (under DDP, rank 0's are broadcast to every rank first). Its parameters
never require gradients, it always runs in eval mode (`train()` is overridden), and it is a
submodule, so it is saved in every checkpoint (with its `n_averaged` counter) and restored on
resume. Every DDP rank applies the same update to the same (all-reduced) student, so teachers stay
equal across ranks.

Batches. Semi-supervised: `{"labeled": batch, "unlabeled": batch}` (datamodules/semi.py): the
unlabeled batch holds the weak view (`image`, to the teacher), the strong view with a cutout
(`image_strong`, to the student) and the erased pixels (`cutout`). Supervised-only control
(`semi=False`): a plain labeled batch.

Phases (xmask/schedule.py). Phase 1: P2R on labeled points; unlabeled: teacher cells with logit >=
`target_threshold` (0, published) are the student's P2R targets on the strong view (erased cells
weigh 0); with `oracle` the unlabeled images' true points are the targets instead (a diagnostic upper
bound: the true points are never used otherwise). The teacher's and the student's count errors on
the unlabeled crops (true points, for the log only) are logged as `train/semi_teacher_count_error`
and `train/semi_student_count_error`, and their means since the last validation as
`val/unlabeled_teacher_count_mae` / `val/unlabeled_student_count_mae`. Phase 2: discriminative
loss of the student's embedding at its own predicted points (logit > 0) against GT masks; unlabeled:
teacher pseudo masks (energy gate), invalid zones of radius `invalid_radius` around unsure teacher
points, region = not erased. Phase 3: P2R + mask constraint on GT masks; unlabeled: P2R on teacher
points + mask constraint on density-gated pseudo masks, only instances under confident teacher
points. Total (sup + w * semi) / (1 + w).

Parameter groups (encoder, fuse, decoder, mask_head) are Adam groups (`crowdseg.optim.make_optimizer`)
whose learning rate is set before every batch from (phase, epoch, step): the phase's rate of the group
times the shared schedule's factor (`crowdseg.optim.schedule_factor`: optim.schedule step or cosine),
0 for a group the phase freezes. Nothing flips requires_grad, and every student parameter gets a
gradient each step (a zero one where the phase does not use it), so DDP's reducer never sees an
unused parameter. (Not a torch scheduler with one lambda per group: a scheduler runs on one clock,
and the rate here can depend on two, phases counted in steps with a decay every `step_size` epochs;
a step-interval scheduler is stepped at the end of the batch before, when the next batch's epoch is
not known yet.) A frozen encoder runs without autograd and in eval
mode (its BN statistics frozen, as published); in phase 3 the student's MaskHead is not run.

Evaluation logs, for `val` and `test`, the student's `mae`, `rmse`, `mse`, `nae` (count = cells with
logit > 0 inside the image), localization `sigma_{s,l}_{precision,recall,f1,...}` of those cells'
centres at 4 / 8 px, and `mean_iou_c` of the predicted instance maps (pseudo-mask builder with the
evaluation settings) when the batch has GT instance maps; the teacher's as `teacher_<key>`.
`evaluate` ("student", as the paper, or "teacher") is the network whose val MAE selects best.ckpt
and which `predict` runs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanMetric

from crowdseg.config.schema import OptimConfig
from crowdseg.errors import DataError
from crowdseg.lit.common import StageHooks, finish_stage, log_losses
from crowdseg.losses.xmask import DiscriminativeLoss, MaskConstraintLoss, P2RLoss
from crowdseg.metrics.torch_metrics import CountingMetrics, InstanceIoU, LocalizationMetrics
from crowdseg.models.xmask import PARAMETER_GROUPS, XMaskNet, count_cells, logit_points
from crowdseg.optim import make_optimizer, schedule_factor
from crowdseg.xmask.discs import disc_union
from crowdseg.xmask.pseudo_masks import PseudoMaskSettings, confident_instances, pseudo_instances
from crowdseg.xmask.schedule import PhaseSchedule, group_learning_rates

LOCALIZATION_RADII = (4.0, 8.0)
EVAL_PSEUDO = PseudoMaskSettings(energy_threshold=1.1, lambda_geo=0.8, sigma=3.0)


def _sizes(batch: dict[str, Any]) -> list[tuple[int, int]]:
    """(H, W) of each image without padding: `meta["valid_size"]` (EvalTransform) or `image_size`."""
    sizes = batch["image_size"].tolist()
    return [tuple(m.get("valid_size") or s) for m, s in zip(batch.get("meta") or [{}] * len(sizes), sizes)]


class _UnlabeledCountErrors:
    """The mean count errors on unlabeled crops accumulated since the last validation (`finish_stage` part)."""

    def __init__(self, errors: nn.ModuleDict):
        self.errors = errors

    def compute(self) -> dict[str, Tensor]:
        if float(self.errors["teacher"].weight) == 0:   # no unlabeled batch since the last validation
            return {}
        return {f"unlabeled_{who}_count_mae": metric.compute() for who, metric in self.errors.items()}

    def reset(self) -> None:
        for metric in self.errors.values():
            metric.reset()


class _Prefixed:
    """A metric whose result keys get a prefix (the teacher's metrics beside the student's)."""

    def __init__(self, metric, prefix: str):
        self.metric, self.prefix = metric, prefix

    def compute(self) -> dict[str, Tensor]:
        values = self.metric.compute()  # synchronised across ranks: every rank decides alike below
        if isinstance(self.metric, InstanceIoU) and int(values["gt_instances"]) == 0:
            return {}  # no GT instance maps in this split: no Mean IoU_C to report
        return {self.prefix + k: v for k, v in values.items()}

    def reset(self) -> None:
        self.metric.reset()


def _keep_key(key: str) -> bool:
    return "level" not in key


def _pad_to(images: Tensor, multiple: int = 32) -> Tensor:
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % multiple, 0, -h % multiple))


def _inside(points: Tensor, height: int, width: int) -> Tensor:
    return (points[:, 0] < width) & (points[:, 1] < height)


class XMaskModule(StageHooks, L.LightningModule):
    """Teacher-student XMask training and evaluation (see the module docstring).

    model: the student `XMaskNet`; schedule: the phases; optim: the `optim` section (weight decay and
    schedule); phase_lrs: {phase: {group: rate}} (`xmask.schedule.default_phase_lrs`); total_steps:
    trainer.max_steps (a cosine's budget); semi: train the unlabeled branch (False: the
    supervised-only control).
    """

    monitor = ("val/mae", "min")

    def __init__(self, model: XMaskNet, schedule: PhaseSchedule, optim: OptimConfig,
                 phase_lrs: Mapping[int, Mapping[str, float]], total_steps: int,
                 p2r: Optional[P2RLoss] = None, discriminative: Optional[DiscriminativeLoss] = None,
                 mask_constraint: Optional[MaskConstraintLoss] = None, semi: bool = True,
                 ema_momentum: float = 0.998, pseudo: PseudoMaskSettings = PseudoMaskSettings(),
                 eval_pseudo: PseudoMaskSettings = EVAL_PSEUDO, invalid_radius: float = 16.0,
                 mc_with_p2r: bool = True, soft_point_mask: bool = False, eval_teacher: bool = True,
                 run_dir: Optional[Path] = None, oracle: bool = False, target_threshold: float = 0.0,
                 evaluate: str = "student", teacher_buffers: str = "copy"):
        super().__init__()
        if evaluate not in ("student", "teacher") or (evaluate == "teacher" and not eval_teacher):
            raise ValueError(f"evaluate must be student or teacher (with eval_teacher), got {evaluate!r}")
        self.model = model
        self.teacher = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_momentum),
                                     use_buffers=teacher_buffers == "ema")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.schedule, self.optim, self.semi = schedule, optim, semi
        self.phase_lrs, self.total_steps = phase_lrs, total_steps
        self.p2r = p2r or P2RLoss(model.stride)
        self.discriminative = discriminative or DiscriminativeLoss(model.stride)
        self.mask_constraint = mask_constraint or MaskConstraintLoss(model.stride)
        self.pseudo, self.eval_pseudo = pseudo, eval_pseudo
        self.invalid_radius, self.mc_with_p2r, self.soft_point_mask = invalid_radius, mc_with_p2r, soft_point_mask
        self.eval_teacher, self.run_dir = eval_teacher, run_dir
        self.oracle, self.target_threshold, self.evaluate = oracle, target_threshold, evaluate
        self.monitor = ("val/mae" if evaluate == "student" else "val/teacher_mae", "min")
        self.unlabeled_errors = nn.ModuleDict({who: MeanMetric() for who in ("teacher", "student")})
        self.timings: Optional[dict[str, float]] = None  # set to {} to accumulate seconds per part
        who = ("student", "teacher") if eval_teacher else ("student",)
        self.metrics = nn.ModuleDict({f"{stage}_{w}": nn.ModuleDict({
            "counting": CountingMetrics(), "localization": LocalizationMetrics(fixed_radii=LOCALIZATION_RADII),
            "iou": InstanceIoU()}) for stage in ("val", "test") for w in who})
        self._phase = 1
        self._optimizer_phase: Optional[int] = None  # the phase whose optimizer state is live (checkpointed)

    # ------------------------------------------------------------------------------ modes, phases
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains, whatever Lightning sets
        if mode:
            self._frozen_modules_to_eval()
        return self

    def _frozen_modules_to_eval(self) -> None:
        trainable = set(self.schedule.trainable(self._phase))
        groups = self.model.groups()
        for name in ("encoder", "mask_head"):
            if name not in trainable:
                groups[name].eval()

    def current_phase(self) -> tuple[int, int]:
        return self.schedule.position(self.current_epoch, self.global_step)

    def learning_rates(self, phase: int, epoch: int, step: int) -> dict[str, float]:
        """{group: rate} at a training position: phase_lrs[phase][group] x schedule_factor(epoch, step),
        0 for the groups `phase` freezes."""
        factor = schedule_factor(self.optim, epoch, step, self.total_steps)
        return group_learning_rates(self.schedule, phase, self.phase_lrs, factor)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        phase, _ = self.current_phase()
        self._phase = phase
        lrs = self.learning_rates(phase, self.current_epoch, self.global_step)
        for optimizer in self.trainer.optimizers:
            if self._optimizer_phase is not None and self._optimizer_phase != phase:
                optimizer.state.clear()  # a new phase starts with a fresh Adam state, as published
            for group in optimizer.param_groups:
                group["lr"] = lrs[group["name"]]
        self._optimizer_phase = phase
        self._frozen_modules_to_eval()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["xmask_optimizer_phase"] = self._optimizer_phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._optimizer_phase = checkpoint.get("xmask_optimizer_phase")

    def configure_optimizers(self):
        groups = self.model.groups()
        return make_optimizer({g: groups[g].parameters() for g in PARAMETER_GROUPS}, self.learning_rates(1, 0, 0),
                              self.optim.weight_decay)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self._sync_student_buffers()
        self.teacher.update_parameters(self.model)

    def _sync_student_buffers(self) -> None:
        """Under DDP, rank 0's student buffers (BN running statistics, updated by each rank's own
        batch) on every rank before the teacher copies them, so teachers stay identical. DDP itself
        broadcasts them only at the start of the next forward."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    @contextmanager
    def _timed(self, key: str):
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    # --------------------------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)

    def _student(self, images: Tensor, embedding: bool) -> dict[str, Tensor]:
        encoder_grad = "encoder" in self.schedule.trainable(self._phase)
        return self.model(images, embedding=embedding, encoder_grad=encoder_grad)

    @torch.no_grad()
    def _teacher(self, images: Tensor, embedding: bool) -> dict[str, Tensor]:
        return self.teacher.module(images, embedding=embedding)

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        labeled = batch["labeled"] if "labeled" in batch else batch
        log_losses(self, losses, len(labeled["points"]))
        return losses["loss"]

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """All loss terms of a batch in the current phase: {"loss", "sup", "semi", "semi_weight", "phase", ...}."""
        phase, local = self.current_phase()
        self._phase = phase
        labeled = batch["labeled"] if "labeled" in batch else batch
        unlabeled = batch.get("unlabeled") if self.semi else None
        weight = self.schedule.semi_weight(phase, local) if unlabeled is not None else 0.0
        step = {1: (self._phase1_sup, self._phase1_semi), 2: (self._phase2_sup, self._phase2_semi),
                3: (self._phase3_sup, self._phase3_semi)}[phase]
        with self._timed("student_sup"):
            sup, logs = step[0](labeled)
        total = sup
        if weight > 0:
            semi, semi_logs = step[1](unlabeled)
            total = (sup + weight * semi) / (1.0 + weight)
            logs.update({f"semi_{k}": v for k, v in semi_logs.items()}, semi=semi.detach())
        # every student parameter takes part in the graph (zero gradient where unused): DDP-safe
        total = total + 0.0 * sum(p.reshape(-1)[:1].sum() for p in self.model.parameters())
        logs.update(loss=total, sup=sup.detach(), semi_weight=sup.new_tensor(weight), phase=sup.new_tensor(float(phase)))
        return logs

    def _instance_maps(self, labeled: dict[str, Any], device) -> list[Tensor]:
        maps = labeled.get("instance_map")
        if maps is None:
            names = [m.get("name") for m in labeled["meta"]]
            raise DataError(f"phase {self._phase} of xmask needs instance masks of the labeled images, and a batch "
                            f"with {names[0]} has none (set data.masks_dir, e.g. to the output of `crowdseg masks`)")
        return [m.to(device).long() for m in maps]

    @staticmethod
    def _predicted_points(logits: Tensor, image_size: Tensor) -> list[Tensor]:
        points = []
        for b, (h, w) in enumerate(image_size.tolist()):
            p, _ = logit_points(logits[b].detach(), 0.0)
            points.append(p[_inside(p, h, w)])
        return points

    def _kept_cells(self, cutout: Optional[Tensor], shape: tuple[int, int]) -> Optional[Tensor]:
        """(B, h, w) float: 1 for cells mostly not erased by the cutout (XMask's crop_den_masks), 0 for
        cells past the cutout mask (padding of a view smaller than the batch's largest)."""
        if cutout is None:
            return None
        kept = (~cutout.bool()).float().unsqueeze(1)
        cells = (F.avg_pool2d(kept, self.model.stride, self.model.stride)[:, 0] >= 0.5).float()
        cells = cells[..., :shape[0], :shape[1]]
        return F.pad(cells, (0, shape[1] - cells.shape[-1], 0, shape[0] - cells.shape[-2]))

    # phase 1 ------------------------------------------------------------------------------------
    def _phase1_sup(self, labeled) -> tuple[Tensor, dict]:
        out = self._student(labeled["image"], embedding=False)
        loss = self.p2r(out["logits"], [p.to(self.device) for p in labeled["points"]])
        return loss, {"p2r": loss.detach()}

    def _phase1_semi(self, unlabeled) -> tuple[Tensor, dict]:
        with self._timed("teacher_forward"):
            t = self._teacher(unlabeled["image"], embedding=False)
            teacher_points = self._teacher_targets(t["logits"], unlabeled["image_size"])
        truth = [p.to(self.device) for p in unlabeled["points"]]
        targets = truth if self.oracle else teacher_points
        with self._timed("student_semi"):
            s = self._student(unlabeled["image_strong"], embedding=False)
            loss = self.p2r(s["logits"], targets, self._kept_cells(unlabeled.get("cutout"), s["logits"].shape[-2:]))
        errors = self._count_errors(teacher_points, s["logits"].detach(), unlabeled["image_size"], truth)
        return loss, {"p2r": loss.detach(), **errors}

    def _count_errors(self, teacher_points: list[Tensor], student_logits: Tensor, image_size: Tensor,
                      truth: list[Tensor]) -> dict[str, Tensor]:
        """Mean |count - true count| of the teacher (its targets) and the student (cells with logit > 0)
        on the unlabeled crops; also accumulated for the next validation's log."""
        true = torch.tensor([float(len(p)) for p in truth], device=student_logits.device)
        teacher = torch.tensor([float(len(p)) for p in teacher_points], device=student_logits.device)
        student = count_cells(student_logits, image_size.to(student_logits.device), stride=self.model.stride)
        out = {"teacher_count_error": (teacher - true).abs().mean(), "student_count_error": (student - true).abs().mean()}
        for who in ("teacher", "student"):
            self.unlabeled_errors[who].update(out[f"{who}_count_error"], weight=len(truth))
        return out

    def _teacher_targets(self, logits: Tensor, image_size: Tensor) -> list[Tensor]:
        """Teacher cells with logit >= `target_threshold` (inside each image), XMask's P2R pseudo points."""
        out = []
        for b, (h, w) in enumerate(image_size.tolist()):
            p, _ = logit_points(logits[b], self.target_threshold, self.model.stride, inclusive=True)
            out.append(p[_inside(p, h, w)])
        return out

    def _pseudo(self, unlabeled, density_gate: bool):
        with self._timed("teacher_forward"):
            t = self._teacher(unlabeled["image"], embedding=True)
        with self._timed("pseudo_masks"):
            sizes = unlabeled["image_size"].tolist()
            pseudo = [pseudo_instances(t["logits"][b], t["embedding"][b], (h, w), self.pseudo, density_gate,
                                       self.model.stride) for b, (h, w) in enumerate(sizes)]
        return t, pseudo

    @staticmethod
    def _regions(unlabeled, sizes) -> Optional[list[Tensor]]:
        cutout = unlabeled.get("cutout")
        if cutout is None:
            return None
        return [~cutout[b, :h, :w].bool() for b, (h, w) in enumerate(sizes)]

    # phase 2 ------------------------------------------------------------------------------------
    def _phase2_sup(self, labeled) -> tuple[Tensor, dict]:
        out = self._student(labeled["image"], embedding=True)
        maps = self._instance_maps(labeled, out["logits"].device)
        points = self._predicted_points(out["logits"], labeled["image_size"])
        terms = self.discriminative(out["embedding"], points, maps,
                                    point_scores=self._point_scores(out["logits"], points))
        return terms["loss"], {k: v for k, v in terms.items() if k != "loss"}

    def _point_scores(self, logits: Tensor, points: list[Tensor]) -> Optional[list[Tensor]]:
        """sigmoid(logit) at each predicted point (the differentiable point-mask term), or None."""
        if not self.soft_point_mask:
            return None
        s = self.model.stride
        out = []
        for b, p in enumerate(points):
            rows = ((p[:, 1] - (s - 1) / 2) / s).round().long()
            cols = ((p[:, 0] - (s - 1) / 2) / s).round().long()
            out.append(torch.sigmoid(logits[b, 0, rows, cols]))
        return out

    def _phase2_semi(self, unlabeled) -> tuple[Tensor, dict]:
        _, pseudo = self._pseudo(unlabeled, density_gate=False)
        sizes = unlabeled["image_size"].tolist()
        with self._timed("student_semi"):
            s = self._student(unlabeled["image_strong"], embedding=True)
            points = self._predicted_points(s["logits"], unlabeled["image_size"])
            invalid = [disc_union(p.points[~p.confident], self.invalid_radius, (h, w))
                       for p, (h, w) in zip(pseudo, sizes)]
            terms = self.discriminative(s["embedding"], points, [p.instance_map for p in pseudo],
                                        self._regions(unlabeled, sizes), invalid,
                                        self._point_scores(s["logits"], points))
        logs = {k: v for k, v in terms.items() if k != "loss"}
        logs["pseudo_instances"] = terms["loss"].new_tensor(float(sum(len(p.points) for p in pseudo)) / len(pseudo))
        return terms["loss"], logs

    # phase 3 ------------------------------------------------------------------------------------
    def _phase3_sup(self, labeled) -> tuple[Tensor, dict]:
        out = self._student(labeled["image"], embedding=False)
        maps = self._instance_maps(labeled, out["logits"].device)
        terms = self.mask_constraint(out["logits"], maps)
        loss, logs = terms["loss"], {f"mc_{k}": v for k, v in terms.items() if k != "loss"}
        if self.mc_with_p2r:
            p2r = self.p2r(out["logits"], [p.to(self.device) for p in labeled["points"]])
            loss, logs["p2r"] = loss + p2r, p2r.detach()
        return loss, logs

    def _phase3_semi(self, unlabeled) -> tuple[Tensor, dict]:
        t, pseudo = self._pseudo(unlabeled, density_gate=True)
        sizes = unlabeled["image_size"].tolist()
        with self._timed("student_semi"):
            s = self._student(unlabeled["image_strong"], embedding=False)
            valid = [confident_instances(p.points, p.confident, p.instance_map, len(p.points)) for p in pseudo]
            terms = self.mask_constraint(s["logits"], [p.instance_map for p in pseudo], valid,
                                         self._regions(unlabeled, sizes))
            loss, logs = terms["loss"], {f"mc_{k}": v for k, v in terms.items() if k != "loss"}
            if self.mc_with_p2r:
                targets = ([p.to(self.device) for p in unlabeled["points"]] if self.oracle
                           else self._teacher_targets(t["logits"], unlabeled["image_size"]))
                p2r = self.p2r(s["logits"], targets, self._kept_cells(unlabeled.get("cutout"), s["logits"].shape[-2:]))
                loss, logs["p2r"] = loss + p2r, p2r.detach()
        return loss, logs

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any], teacher: bool = False, instance_maps: bool = True) -> list[dict]:
        """Per image: {"count", "points" (N, 2), "instance_map" (H, W) or None} of the student (or teacher)."""
        net = self.teacher.module if teacher else self.model
        out = net(_pad_to(batch["image"]), embedding=instance_maps)
        sizes = _sizes(batch)
        counts = count_cells(out["logits"], torch.tensor(sizes, device=out["logits"].device), stride=net.stride)
        results = []
        for b, (h, w) in enumerate(sizes):
            points, _ = logit_points(out["logits"][b], 0.0, net.stride)
            inst = None
            if instance_maps:
                inst = pseudo_instances(out["logits"][b], out["embedding"][b], (h, w), self.eval_pseudo,
                                        stride=net.stride).instance_map
            results.append({"count": float(counts[b]), "points": points[_inside(points, h, w)], "instance_map": inst})
        return results

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        gt_maps = batch.get("instance_map")
        gt_counts = torch.tensor([len(p) for p in batch["points"]], dtype=torch.float, device=self.device)
        for who in (("student", "teacher") if self.eval_teacher else ("student",)):
            metrics = self.metrics[f"{stage}_{who}"]
            preds = self.predict_batch(batch, teacher=who == "teacher", instance_maps=gt_maps is not None)
            metrics["counting"].update(torch.tensor([p["count"] for p in preds], device=self.device), gt_counts)
            metrics["localization"].update([p["points"] for p in preds], batch["points"])
            if gt_maps is not None:
                metrics["iou"].update([p["instance_map"] for p in preds],
                                      [m[:h, :w] for m, (h, w) in zip(gt_maps, _sizes(batch))])

    def _end_stage(self, stage: str) -> dict[str, float]:
        parts = []
        for who in (("student", "teacher") if self.eval_teacher else ("student",)):
            prefix = "" if who == "student" else "teacher_"
            m = self.metrics[f"{stage}_{who}"]
            parts += [_Prefixed(m[k], prefix) for k in ("counting", "localization", "iou")]
        if stage == "val":
            parts.append(_UnlabeledCountErrors(self.unlabeled_errors))
        return finish_stage(self, stage, parts, self.run_dir, keep=_keep_key)

    def predict_step(self, batch, batch_idx):
        return [{"name": m.get("name"), **{k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in p.items()}}
                for m, p in zip(batch["meta"], self.predict_batch(batch, teacher=self.evaluate == "teacher"))]
