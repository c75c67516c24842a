"""LightningModule of the P2PNet-style point predictor: orchestration only, the math lives elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from crowdseg.choices import MASK_POINTS
from crowdseg.config.schema import OptimConfig
from crowdseg.lit.common import StageHooks, finish_stage, inside_image, log_losses
from crowdseg.losses.mask_counting import PointMaskLoss
from crowdseg.losses.p2p import P2PLoss
from crowdseg.metrics.torch_metrics import CountingMetrics, LocalizationMetrics
from crowdseg.models.p2p import PointPredictor, select_points
from crowdseg.optim import build_optimizer, heads_and_backbone, heads_and_backbone_rates
from crowdseg.vis import picture_slots, point_overlay, save_pictures

# Localization is scored at fixed radii (sigma_s = 4 px, sigma_l = 8 px) on every dataset, so the
# numbers compare across datasets with and without head boxes; size levels are then unknown.
LOCALIZATION_RADII = (4.0, 8.0)


def _localization_key(key: str) -> bool:
    return "level" not in key


def in_original_pixels(points: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """Points (P_b, 2) of loaded images in the pixels of the original files (`meta["scale"]` is loaded
    pixels per original pixel): matching these at r px is matching the loaded ones at r x scale."""
    return [p / s for p, s in zip(points, scales)]


class PointPredictorModule(StageHooks, L.LightningModule):
    """Train/evaluate a `PointPredictor` with `P2PLoss` (+ an optional `PointMaskLoss`).

    Training logs ``train/loss``, ``train/cls``, ``train/point`` and, with a mask loss,
    ``train/mask_loss``, ``train/mask_background``, ``train/mask_unit_mass`` and
    ``train/mask_skipped`` (1 for a batch in which some image has no ``instance_map``: the mask loss
    is skipped for the whole batch, since the collated batch then carries no maps).
    The mask loss scores either the predicted points (`mask_points="predicted"`: a point predicted
    on background or a second point in a person's mask is penalised where it ended up) or the
    anchors (`"anchors"`), with the person probabilities ``softmax(logits)[..., 1]``.

    Points are selected with `select_points(..., score_threshold, merge_radius)`: merge_radius 0
    (P2PNet) keeps every prediction scoring above the threshold; r > 0 merges predictions closer
    than r pixels and sums their scores first (`models.p2p.merge_points`).

    Evaluation logs ``<stage>/mae``, ``rmse``, ``mse``, ``nae`` and localization
    ``<stage>/sigma_{s,l}_{precision,recall,f1,tp,fp,fn}`` at radii 4 and 8 px
    (`LOCALIZATION_RADII`) on the loaded images, and ``<stage>/orig_sigma_*`` at 4 and 8 px of the
    original images (the papers' protocol; `in_original_pixels`), for stage ``val`` and ``test``; writes them to
    ``<run_dir>/metrics/<stage>.json`` (rank 0) and saves up to `num_pictures` overlays (GT points
    green, predictions red) to ``<run_dir>/pictures/`` and wandb.

    Optimizer (`crowdseg.optim.build_optimizer`): Adam, groups "heads" (`optim.lr`) and "backbone"
    (`optim.backbone_lr`), `optim.schedule` over `total_steps` (trainer.max_steps) for a cosine.
    """

    monitor = ("val/mae", "min")

    def __init__(self, model: PointPredictor, criterion: P2PLoss, optim: OptimConfig, total_steps: int,
                 score_threshold: float = 0.5, run_dir: Optional[Path] = None, num_pictures: int = 4,
                 mask_loss: Optional[PointMaskLoss] = None, mask_points: str = "predicted",
                 merge_radius: float = 0.0):
        super().__init__()
        if mask_points not in MASK_POINTS:
            raise ValueError(f"mask_points must be one of {MASK_POINTS}, got {mask_points!r}")
        self.model, self.criterion, self.optim, self.total_steps = model, criterion, optim, total_steps
        self.mask_loss, self.mask_points = mask_loss, mask_points
        self.score_threshold, self.run_dir, self.num_pictures = score_threshold, run_dir, num_pictures
        self.merge_radius = float(merge_radius)
        self.counting = nn.ModuleDict({"val": CountingMetrics(), "test": CountingMetrics()})
        self.localization = nn.ModuleDict({s: LocalizationMetrics(fixed_radii=LOCALIZATION_RADII)
                                           for s in ("val", "test")})
        self.localization_orig = nn.ModuleDict({s: LocalizationMetrics(fixed_radii=LOCALIZATION_RADII, prefix="orig_")
                                                for s in ("val", "test")})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    # ---------------------------------------------------------------------------------- training
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """All loss terms of a batch: {"loss" (the total), "cls", "point", and "mask_*" with a mask loss}."""
        outputs = self.model(batch["image"])
        losses = dict(self.criterion(outputs, batch["points"]))
        if self.mask_loss is None:
            return losses
        maps = batch.get("instance_map")
        if maps is None:
            losses["mask_skipped"] = losses["loss"].new_tensor(1.0)
            return losses
        scores = outputs["logits"].softmax(-1)[..., 1]
        points = outputs["anchors"] if self.mask_points == "anchors" else outputs["points"]
        mask = self.mask_loss(points, scores, [m.to(scores.device) for m in maps])
        losses.update(loss=losses["loss"] + mask["loss"], mask_loss=mask["loss"].detach(),
                      mask_background=mask["background"], mask_unit_mass=mask["unit_mass"],
                      mask_skipped=losses["loss"].new_tensor(0.0))
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        log_losses(self, losses, len(batch["points"]))
        return losses["loss"]

    # -------------------------------------------------------------------------------- evaluation
    def predict_points(self, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs = self.model(batch["image"])
        selected = select_points(outputs["points"], outputs["logits"], self.score_threshold, self.merge_radius)
        # drop predictions that fell into the zero padding of smaller images in the batch
        result = []
        for (points, scores), (h, w) in zip(selected, batch["image_size"].tolist()):
            inside = inside_image(points, h, w)
            result.append((points[inside], scores[inside]))
        return result

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        predictions = self.predict_points(batch)
        pred_counts = torch.tensor([len(p) for p, _ in predictions], dtype=torch.float, device=self.device)
        gt_counts = torch.tensor([len(p) for p in batch["points"]], dtype=torch.float, device=self.device)
        self.counting[stage].update(pred_counts, gt_counts)
        self.localization[stage].update([p.detach() for p, _ in predictions], batch["points"])
        scales = [float(m.get("scale", 1.0)) for m in batch["meta"]]
        self.localization_orig[stage].update(in_original_pixels([p.detach() for p, _ in predictions], scales),
                                             in_original_pixels(batch["points"], scales))
        self._save_pictures(stage, batch, batch_idx, predictions)

    def _end_stage(self, stage: str) -> dict[str, float]:
        return finish_stage(self, stage, [self.counting[stage], self.localization[stage], self.localization_orig[stage]],
                            self.run_dir, keep=_localization_key)

    def predict_step(self, batch, batch_idx):
        return [{"name": m.get("name"), "points": p.cpu(), "scores": s.cpu()}
                for m, (p, s) in zip(batch["meta"], self.predict_points(batch))]

    def _save_pictures(self, stage: str, batch, batch_idx: int, predictions) -> None:
        if self.run_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        pictures = []
        for i, number in picture_slots(batch_idx, len(batch["points"]), self.num_pictures):
            h, w = batch["image_size"][i].tolist()
            pictures.append((number, point_overlay(batch["image"][i, :, :h, :w], batch["points"][i],
                                                   predictions[i][0])))
        save_pictures(self.run_dir, stage, pictures, self.loggers, self.global_step)

    def configure_optimizers(self):
        return build_optimizer(heads_and_backbone(self.model, self.model.backbone),
                               heads_and_backbone_rates(self.optim), self.optim, self.total_steps)
