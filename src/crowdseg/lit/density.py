"""LightningModule of the density-map counter (`method: density`): orchestration only."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from crowdseg.config.schema import OptimConfig
from crowdseg.lit.common import StageHooks, finish_stage, log_losses
from crowdseg.losses.density import DensityLoss, density_point_logits
from crowdseg.losses.mask_counting import DensityMaskLoss, SoftOnePointLoss
from crowdseg.metrics.torch_metrics import CountingMetrics
from crowdseg.models.density import DensityCounter, density_count_in_region
from crowdseg.optim import build_optimizer, heads_and_backbone, heads_and_backbone_rates
from crowdseg.vis import density_overlay, picture_slots, save_pictures


class DensityModule(StageHooks, L.LightningModule):
    """Train/evaluate a `DensityCounter` with `DensityLoss` (+ optional mask-supervised terms).

    Mask terms (need ``batch["instance_map"]``; a batch in which some image has none skips them and
    logs ``train/mask_skipped`` = 1):
    - `mask_loss` (`DensityMaskLoss`): no density on background, unit mass per instance mask;
    - `one_point_loss` (`SoftOnePointLoss`) on ``log(density / one_point_threshold)``: about one
      stride-8 cell above the threshold per instance (see `density_point_logits`).

    Training logs ``train/loss`` (the total), ``train/density`` (the Gaussian-target squared error),
    ``train/count_error`` and, with mask terms, ``train/mask_loss``, ``train/mask_background``,
    ``train/mask_unit_mass``, ``train/mask_one_point``, ``train/mask_one_point_hard``,
    ``train/mask_skipped``. Evaluation logs ``<stage>/mae``, ``rmse``, ``mse``, ``nae`` (the count
    of an image is the sum of its density over the cells inside it) for ``val`` and ``test``,
    writes them to ``<run_dir>/metrics/<stage>.json`` (rank 0) and saves up to `num_pictures`
    heat-map overlays with the GT points to ``<run_dir>/pictures/`` and wandb.

    Optimizer (`crowdseg.optim.build_optimizer`): Adam, groups "heads" (`optim.lr`) and "backbone"
    (`optim.backbone_lr`), `optim.schedule` over `total_steps` (trainer.max_steps) for a cosine.
    """

    monitor = ("val/mae", "min")

    def __init__(self, model: DensityCounter, criterion: DensityLoss, optim: OptimConfig, total_steps: int,
                 mask_loss: Optional[DensityMaskLoss] = None, one_point_loss: Optional[SoftOnePointLoss] = None,
                 one_point_threshold: float = 0.25, run_dir: Optional[Path] = None, num_pictures: int = 4):
        super().__init__()
        self.model, self.criterion, self.optim, self.total_steps = model, criterion, optim, total_steps
        self.mask_loss, self.one_point_loss = mask_loss, one_point_loss
        self.one_point_threshold = float(one_point_threshold)
        self.run_dir, self.num_pictures = run_dir, num_pictures
        self.counting = nn.ModuleDict({"val": CountingMetrics(), "test": CountingMetrics()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    # ---------------------------------------------------------------------------------- training
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """All loss terms of a batch: {"loss" (the total), "density", "count_error", "mask_*"}."""
        density = self.model(batch["image"])["density"]
        base = self.criterion(density, batch["points"], batch["image_size"])
        losses = {"loss": base["loss"], "density": base["loss"].detach(), "count_error": base["count_error"]}
        if self.mask_loss is None and self.one_point_loss is None:
            return losses
        maps = batch.get("instance_map")
        skipped = maps is None
        losses["mask_skipped"] = density.new_tensor(float(skipped))
        if skipped:
            return losses
        maps = [m.to(density.device) for m in maps]
        mask_total = density.sum() * 0.0
        if self.mask_loss is not None:
            mask = self.mask_loss(density, maps)
            mask_total = mask_total + mask["loss"]
            losses.update(mask_background=mask["background"], mask_unit_mass=mask["unit_mass"])
        if self.one_point_loss is not None:
            one = self.one_point_loss(density_point_logits(density, self.one_point_threshold), maps)
            mask_total = mask_total + one["loss"]
            losses.update(mask_one_point=one["one_point"], mask_one_point_hard=one["one_point_hard"])
        losses.update(loss=losses["loss"] + mask_total, mask_loss=mask_total.detach())
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        log_losses(self, losses, len(batch["points"]))
        return losses["loss"]

    # -------------------------------------------------------------------------------- evaluation
    def predict_density(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(density (B, 1, h, w), counts (B,)): counts only over the cells inside each image."""
        density = self.model(batch["image"])["density"]
        return density, density_count_in_region(density, batch["image_size"], self.model.stride)

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        density, counts = self.predict_density(batch)
        gt_counts = torch.tensor([len(p) for p in batch["points"]], dtype=torch.float, device=counts.device)
        self.counting[stage].update(counts.detach(), gt_counts)
        self._save_pictures(stage, batch, batch_idx, density, counts)

    def _end_stage(self, stage: str) -> dict[str, float]:
        return finish_stage(self, stage, [self.counting[stage]], self.run_dir)

    def predict_step(self, batch, batch_idx):
        density, counts = self.predict_density(batch)
        return [{"name": m.get("name"), "count": float(c), "density": d[0].cpu()}
                for m, c, d in zip(batch["meta"], counts, density)]

    def _save_pictures(self, stage: str, batch, batch_idx: int, density: torch.Tensor,
                       counts: torch.Tensor) -> None:
        if self.run_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        stride = self.model.stride
        pictures = []
        for i, number in picture_slots(batch_idx, len(batch["points"]), self.num_pictures):
            h, w = batch["image_size"][i].tolist()
            cells = density[i, 0, :-(-h // stride), :-(-w // stride)]  # the cells covering the image
            picture = density_overlay(batch["image"][i, :, :h, :w], cells, batch["points"][i], float(counts[i]))
            pictures.append((number, picture))
        save_pictures(self.run_dir, stage, pictures, self.loggers, self.global_step)

    def configure_optimizers(self):
        return build_optimizer(heads_and_backbone(self.model, self.model.backbone),
                               heads_and_backbone_rates(self.optim), self.optim, self.total_steps)
