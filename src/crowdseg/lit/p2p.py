"""LightningModule of the P2PNet-style point predictor: orchestration only, the math lives elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from crowdseg.losses.p2p import P2PLoss
from crowdseg.metrics.torch_metrics import CountingMetrics
from crowdseg.models.p2p import PointPredictor, select_points
from crowdseg.vis import point_overlay, save_png


class PointPredictorModule(L.LightningModule):
    """Train/evaluate a `PointPredictor` with `P2PLoss`.

    Logs ``train/loss`` (+ parts), ``val/mae``, ``val/rmse`` (and ``test/...``); saves up to
    `num_pictures` overlays (image, GT points green, predictions red) per evaluation to
    `<run_dir>/pictures/` and to wandb.
    """

    monitor = ("val/mae", "min")

    def __init__(self, model: PointPredictor, criterion: P2PLoss, optim: dict[str, Any],
                 score_threshold: float = 0.5, run_dir: Optional[Path] = None, num_pictures: int = 4):
        super().__init__()
        self.model, self.criterion, self.optim = model, criterion, dict(optim)
        self.score_threshold, self.run_dir, self.num_pictures = score_threshold, run_dir, num_pictures
        self.counting = nn.ModuleDict({"val": CountingMetrics(), "test": CountingMetrics()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self.model(batch["image"])
        losses = self.criterion(outputs, batch["points"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch["points"]))
        self.log_dict({"train/cls": losses["cls"], "train/point": losses["point"]}, batch_size=len(batch["points"]))
        return losses["loss"]

    def predict_points(self, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs = self.model(batch["image"])
        selected = select_points(outputs["points"], outputs["logits"], self.score_threshold)
        # drop predictions that fell into the zero padding of smaller images in the batch
        result = []
        for (points, scores), (h, w) in zip(selected, batch["image_size"].tolist()):
            inside = (points[:, 0] >= -0.5) & (points[:, 0] < w - 0.5) & (points[:, 1] >= -0.5) & (points[:, 1] < h - 0.5)
            result.append((points[inside], scores[inside]))
        return result

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        predictions = self.predict_points(batch)
        pred_counts = torch.tensor([len(p) for p, _ in predictions], dtype=torch.float, device=self.device)
        gt_counts = torch.tensor([len(p) for p in batch["points"]], dtype=torch.float, device=self.device)
        self.counting[stage].update(pred_counts, gt_counts)
        self._save_pictures(stage, batch, batch_idx, predictions)

    def _log_stage(self, stage: str) -> dict[str, float]:
        values = {f"{stage}/{k}": v for k, v in self.counting[stage].compute().items()}
        self.log_dict(values, sync_dist=False)  # already synced by the metric
        self.counting[stage].reset()
        return {k: float(v) for k, v in values.items()}

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch, batch_idx)

    def on_validation_epoch_end(self):
        self._log_stage("val")

    def on_test_epoch_end(self):
        self._log_stage("test")

    def predict_step(self, batch, batch_idx):
        return [{"name": m.get("name"), "points": p.cpu(), "scores": s.cpu()}
                for m, (p, s) in zip(batch["meta"], self.predict_points(batch))]

    def _save_pictures(self, stage: str, batch, batch_idx: int, predictions) -> None:
        if self.run_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        first = batch_idx * len(batch["points"])
        pictures = []
        for i in range(len(batch["points"])):
            if first + i >= self.num_pictures:
                break
            h, w = batch["image_size"][i].tolist()
            picture = point_overlay(batch["image"][i, :, :h, :w], batch["points"][i], predictions[i][0])
            save_png(Path(self.run_dir) / "pictures" / f"{stage}_{first + i:02d}.png", picture)
            pictures.append(picture)
        wandb_logger = next((lg for lg in self.loggers if type(lg).__name__ == "WandbLogger"), None)
        if wandb_logger is not None and pictures:
            wandb_logger.log_image(key=f"{stage}/predictions", images=pictures, step=self.global_step)

    def configure_optimizers(self):
        backbone = list(self.model.backbone.parameters())
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if id(p) not in backbone_ids]
        optimizer = torch.optim.Adam([{"params": rest, "lr": self.optim["lr"]},
                                      {"params": backbone, "lr": self.optim["backbone_lr"]}],
                                     weight_decay=self.optim["weight_decay"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.optim["step_size"], self.optim["gamma"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
