"""LightningModule of BoxInst (+ OverlapLoss): orchestration only; the math is in losses/ and models/.

Training (boxes only, no mask annotation): FCOS losses on every location; for each image the top
`topk_proposals_per_image` positive locations, split evenly over its GT boxes and ranked by
class probability x centre-ness, get their stride-4 mask logits from the dynamic head; those are
scored by the projection term, the pairwise colour term (linear warm-up over `pairwise_warmup`
steps) and, with `overlap_weight` > 0, OverlapLoss (one uniformly sampled proposal per GT against
the proposals of the other GTs of its image).

Evaluation: detections (`postprocess`), their masks pasted at the original image size, COCO mask
AP (`MaskAP`, against the instance maps, areas = mask areas, `ignore_boxes` as `iscrowd` regions), box
AP against the boxes trained on, and the summed overlap degree of the predicted masks with score >=
`overlap_score_threshold`. Beside them, the box supervision measured apart from detection: for every
ground-truth box, the mask of its best positive location (`gt_box_locations`) cropped to the box,
scored by mean IoU and mask AP against the instance's mask (`gtbox_*`), and the filled box itself
(`gtboxfill_*`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import torch
from torch import nn

from crowdseg.config.schema import OptimConfig
from crowdseg.lit.common import StageHooks, finish_stage, log_losses
from crowdseg.losses.boxinst import (box_masks, color_similarity, image_lab, image_valid_masks, overlap_loss,
                                     pairwise_loss, projection_loss, sample_one_per_group, warmup_factor)
from crowdseg.losses.fcos import fcos_losses, fcos_targets
from crowdseg.metrics.detection import BoxAP, MaskOverlap, PairedMaskIoU
from crowdseg.metrics.torch_metrics import MaskAP
from crowdseg.models.boxinst import BoxInst, pad_to, postprocess, predict_masks
from crowdseg.optim import build_optimizer, heads_and_backbone, heads_and_backbone_rates
from crowdseg.vis import enlarge, overlay_masks, picture_slots, save_pictures, to_uint8_image, with_caption

if TYPE_CHECKING:  # pragma: no cover
    from crowdseg.methods.boxinst import BoxInstConfig


def select_proposals(scores: torch.Tensor, image_index: torch.Tensor, gt_index: torch.Tensor, num_images: int,
                     topk_per_image: int) -> torch.Tensor:
    """Keep at most max(topk_per_image // G_b, 1) positives per GT (G_b GTs with positives in image b),
    the best by `scores`. Vectorised. scores, image_index, gt_index: (P,) -> kept indices (K,) into P.

    topk_per_image <= 0 keeps every positive.
    """
    if topk_per_image <= 0 or scores.numel() == 0:
        return torch.arange(scores.numel(), device=scores.device)
    span = int(gt_index.max()) + 1
    unique_groups, dense = torch.unique(image_index * span + gt_index, return_inverse=True)
    gts_per_image = torch.bincount(unique_groups // span, minlength=num_images)
    per_gt = (topk_per_image // gts_per_image.clamp_min(1)).clamp_min(1)
    # rank within each group by descending score: sort by score, then stably by group
    order = torch.argsort(scores, descending=True)
    order = order[torch.argsort(dense[order], stable=True)]
    sorted_groups = dense[order]
    starts = torch.searchsorted(sorted_groups, torch.arange(len(unique_groups), device=scores.device))
    rank = torch.arange(len(order), device=scores.device) - starts[sorted_groups]
    keep = rank < per_gt[image_index[order]]
    return order[keep].sort().values


class BoxInstModule(StageHooks, L.LightningModule):
    """Train / evaluate a `BoxInst` from boxes (see the module docstring).

    Logs ``train/loss``, ``train/{cls,box,ctrness,projection,pairwise,overlap,pairwise_factor,
    num_pos,proposals}`` and ``<stage>/{mask_ap,mask_ap50,mask_ap75,mask_aps,mask_apm,mask_apl,
    boxfill_mask_ap,boxfill_mask_ap50,...,box_ap,box_ap50,box_ap75,overlap,overlapping,detections}``
    for val and test (``boxfill_*``: the box baseline, each detected box filled as its mask); writes
    ``<run_dir>/metrics/<stage>.json`` and overlays to ``<run_dir>/pictures/``.

    settings: the `boxinst` config section (its `loss`, `inference` and `solver` are read here; FCOS's
    sizes of interest are the model's); optim, total_steps: the `optim` section and trainer.max_steps.
    Optimizer (`crowdseg.optim.build_optimizer`): `solver.optimizer` over the trainable parameters,
    groups "heads" (`optim.lr`) and "backbone" (`optim.backbone_lr`); `optim.schedule` step is
    detectron2's warm-up + decays at `solver.milestones` (per step), cosine the shared one.
    """

    monitor = ("val/mask_ap", "max")

    def __init__(self, model: BoxInst, settings: "BoxInstConfig", optim: OptimConfig, total_steps: int,
                 run_dir: Optional[Path] = None, num_pictures: int = 4, seed: int = 0):
        super().__init__()
        self.model, self.settings, self.optim, self.total_steps = model, settings, optim, total_steps
        self.run_dir, self.num_pictures, self.seed = run_dir, num_pictures, seed
        self.mask_ap = nn.ModuleDict({s: MaskAP() for s in ("val", "test")})
        self.boxfill_ap = nn.ModuleDict({s: MaskAP(prefix="boxfill_") for s in ("val", "test")})
        self.gtbox_ap = nn.ModuleDict({s: MaskAP(prefix="gtbox_") for s in ("val", "test")})
        self.gtboxfill_ap = nn.ModuleDict({s: MaskAP(prefix="gtboxfill_") for s in ("val", "test")})
        self.gtbox_iou = nn.ModuleDict({s: PairedMaskIoU("gtbox_") for s in ("val", "test")})
        self.gtboxfill_iou = nn.ModuleDict({s: PairedMaskIoU("gtboxfill_") for s in ("val", "test")})
        self.box_ap = nn.ModuleDict({s: BoxAP() for s in ("val", "test")})
        self.overlap = nn.ModuleDict({s: MaskOverlap() for s in ("val", "test")})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(pad_to(images))

    # ---------------------------------------------------------------------------------- training
    def _boxes(self, batch: dict[str, Any], key: Optional[str] = None) -> list[torch.Tensor]:
        """The training boxes of every image, clipped to the image."""
        key = key or self.settings.loss.box_key
        boxes = batch.get(key)
        if boxes is None:
            raise KeyError(f"the batch has no {key!r} (boxinst.loss.box_key)")
        out = []
        for b, (h, w) in zip(boxes, batch["image_size"].tolist()):
            b = b.to(self.device).float().reshape(-1, 4).clone()
            b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
            b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
            out.append(b)
        return out

    def _num_positives(self, count: torch.Tensor) -> float:
        """The positives per image batch averaged over ranks (FCOS normalises by it)."""
        trainer = self._trainer  # None when the module runs on its own (benchmarks)
        if trainer is not None and trainer.world_size > 1:
            count = trainer.strategy.reduce(count.float(), reduce_op="mean")
        return float(count)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.global_step) * 101 + self.global_rank)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = self.settings.loss
        images = pad_to(batch["image"])
        outputs = self.model(images)
        boxes = self._boxes(batch)
        ignore = batch.get("ignore_boxes")
        targets = [fcos_targets(outputs["locations"], outputs["levels"], self.model.strides, b, None,
                                ignore[i].to(self.device) if ignore is not None else None, self.model.sizes_of_interest,
                                s.center_radius) for i, b in enumerate(boxes)]
        labels = torch.stack([t.labels for t in targets])
        losses = fcos_losses(outputs["cls_logits"], outputs["box_ltrb"], outputs["ctrness"], outputs["locations"],
                             targets, self._num_positives((labels >= 0).sum()), s.focal_alpha, s.focal_gamma)

        image_index, location_index = torch.nonzero(labels >= 0, as_tuple=True)
        gt_local = torch.stack([t.gt_index for t in targets])[image_index, location_index]
        with torch.no_grad():
            scores = (outputs["cls_logits"][image_index, location_index].sigmoid().amax(-1)
                      * outputs["ctrness"][image_index, location_index].sigmoid())
        keep = select_proposals(scores, image_index, gt_local, len(boxes), s.topk_proposals_per_image)
        image_index, location_index, gt_local = image_index[keep], location_index[keep], gt_local[keep]
        mask_logits = self.model.mask_logits(outputs, image_index, location_index)        # (P, H/4, W/4)

        height, width = images.shape[-2:]
        stride = self.model.mask_out_stride
        offsets = torch.tensor([0] + [len(b) for b in boxes], device=self.device).cumsum(0)
        gt_global = offsets[image_index] + gt_local
        all_boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4, device=self.device)
        targets_b = box_masks(all_boxes[gt_global], height, width, stride)
        projection = projection_loss(mask_logits, targets_b)
        scale = torch.tensor([float(m.get("scale", 1.0)) for m in batch["meta"]], device=self.device)
        valid = image_valid_masks(batch["image_size"].to(self.device), height, width, stride,
                                  s.bottom_pixels_removed * scale)
        with torch.no_grad():
            similarity = color_similarity(image_lab(images, stride), valid, 3, s.pairwise_dilation)
        factor = warmup_factor(self.global_step, s.pairwise_warmup)
        pairwise = pairwise_loss(mask_logits, similarity[image_index], targets_b, s.pairwise_threshold, 3,
                                 s.pairwise_dilation)
        total = (losses["cls"] + losses["box"] + losses["ctrness"] + s.projection_weight * projection
                 + s.pairwise_weight * factor * pairwise)
        out = {"cls": losses["cls"], "box": losses["box"], "ctrness": losses["ctrness"], "projection": projection,
               "pairwise": pairwise, "pairwise_factor": torch.tensor(factor), "num_pos": losses["num_pos"],
               "proposals": torch.tensor(float(len(keep)))}
        if s.overlap_weight > 0:
            chosen = sample_one_per_group(gt_global, self._generator())
            overlap = overlap_loss(mask_logits.sigmoid(), gt_global, image_index, chosen, s.overlap_normalization)
            total = total + s.overlap_weight * overlap
            out["overlap"] = overlap
        out["loss"] = total
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        log_losses(self, losses, len(batch["image"]))
        return losses["loss"]

    # -------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_instances(self, batch: dict[str, Any], outputs: Optional[dict[str, torch.Tensor]] = None
                          ) -> list[dict[str, torch.Tensor]]:
        """Per image: {"masks" (K, H, W) bool at the original size, "scores" (K,), "boxes" (K, 4) in
        original pixels, "labels" (K,), "locations" (K,)}, best score first. `outputs`: the model's
        outputs on the batch when they are at hand."""
        s = self.settings.inference
        if outputs is None:
            outputs = self.model(pad_to(batch["image"]))
        sizes = batch["image_size"].to(self.device)
        detections = postprocess(outputs, sizes, s.score_threshold, s.pre_nms_topk, s.nms_threshold, s.max_detections)
        originals = batch.get("orig_instance_map")
        results = []
        for b, det in enumerate(detections):
            h, w = (int(v) for v in sizes[b])
            if originals is not None:
                out_size = tuple(originals[b].shape[-2:])
            else:
                out_size = (h, w)
            boxes = to_size(det["boxes"], (h, w), out_size)
            if s.box_masks:
                masks = filled_boxes(boxes, out_size)
            else:
                masks = predict_masks(self.model, outputs, b, det["locations"], (h, w), out_size, s.mask_threshold,
                                      s.paste_chunk)
            results.append({"masks": masks, "scores": det["scores"], "boxes": boxes, "labels": det["labels"],
                            "locations": det["locations"]})
        return results

    def _targets(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """GT instance maps at the original size (the eval transform's padding cut off)."""
        if batch.get("orig_instance_map") is not None:
            return [m.to(self.device) for m in batch["orig_instance_map"]]
        if batch.get("instance_map") is None:
            raise KeyError("evaluation needs instance masks (`instance_map`); this dataset has none")
        return [m[:h, :w].to(self.device) for m, (h, w) in zip(batch["instance_map"], batch["image_size"].tolist())]

    @torch.no_grad()
    def gt_box_masks(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                     sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Per image, for each ground-truth box k (`loss.box_key`, else `boxes` when the evaluation set
        has only those): {"masks" (G, H, W) the predicted mask of its best positive location cropped
        to the box, "filled" (G, H, W) the box itself, "scores" (G,)}, at the original sizes `sizes`."""
        s = self.settings
        boxes = self._boxes(batch, self._eval_box_key(batch))
        results = []
        for b, (gt, size) in enumerate(zip(boxes, sizes)):
            h, w = batch["image_size"][b].tolist()
            locations, scores = gt_box_locations(outputs, b, gt, self.model.strides, self.model.sizes_of_interest,
                                                 s.loss.center_radius)
            filled = filled_boxes(to_size(gt, (h, w), size), size)
            masks = predict_masks(self.model, outputs, b, locations, (h, w), size, s.inference.mask_threshold,
                                  s.inference.paste_chunk) & filled
            results.append({"masks": masks, "filled": filled, "scores": scores})
        return results

    def _eval_box_key(self, batch: dict[str, Any]) -> Optional[str]:
        """The ground-truth boxes evaluation compares with: the trained kind, else the set's `boxes`."""
        for key in (self.settings.loss.box_key, "boxes"):
            if batch.get(key) is not None:
                return key
        return None

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        threshold = self.settings.inference.overlap_score_threshold
        box_key = self._eval_box_key(batch)
        outputs = self.model(pad_to(batch["image"]))
        predictions = self.predict_instances(batch, outputs)
        targets = self._targets(batch)
        sizes = [tuple(t.shape[-2:]) for t in targets]
        resized = batch["image_size"].tolist()
        crowds = batch["ignore_boxes"] if batch.get("ignore_boxes") is not None else [torch.zeros(0, 4)] * len(targets)
        truth = [{"instance_map": t, "crowd_masks": filled_boxes(to_size(c.to(self.device).float().reshape(-1, 4), hw, size),
                                                                 size)}
                 for t, c, hw, size in zip(targets, crowds, resized, sizes)]
        self.mask_ap[stage].update([{"masks": p["masks"], "scores": p["scores"]} for p in predictions], truth)
        self.boxfill_ap[stage].update([{"masks": filled_boxes(p["boxes"], size), "scores": p["scores"]}
                                       for p, size in zip(predictions, sizes)], truth)
        if box_key is not None:
            on_gt = self.gt_box_masks(batch, outputs, sizes)
            gt_masks = [t[None] == torch.arange(1, len(g["masks"]) + 1, device=t.device)[:, None, None]
                        for t, g in zip(targets, on_gt)]
            self.gtbox_iou[stage].update([g["masks"] for g in on_gt], gt_masks)
            self.gtboxfill_iou[stage].update([g["filled"] for g in on_gt], gt_masks)
            self.gtbox_ap[stage].update([{"masks": g["masks"], "scores": g["scores"]} for g in on_gt], truth)
            self.gtboxfill_ap[stage].update([{"masks": g["filled"], "scores": g["scores"]} for g in on_gt], truth)
            gt_boxes = batch[box_key]
            scale = [float(m.get("scale", 1.0)) for m in batch["meta"]]
            self.box_ap[stage].update([p["boxes"] for p in predictions], [p["scores"] for p in predictions],
                                      [g.to(self.device).float() / sc for g, sc in zip(gt_boxes, scale)])
        self.overlap[stage].update([p["masks"][p["scores"] >= threshold] for p in predictions])
        self._save_pictures(stage, batch, batch_idx, predictions)

    def _end_stage(self, stage: str) -> dict[str, float]:
        metrics = [self.mask_ap[stage], self.boxfill_ap[stage], self.box_ap[stage], self.overlap[stage],
                   self.gtbox_iou[stage], self.gtboxfill_iou[stage], self.gtbox_ap[stage], self.gtboxfill_ap[stage]]
        return finish_stage(self, stage, metrics, self.run_dir, keep=lambda key: "mask_ar" not in key)

    def predict_step(self, batch, batch_idx):
        threshold = self.settings.inference.overlap_score_threshold
        out = []
        for meta, p in zip(batch["meta"], self.predict_instances(batch)):
            out.append({"name": meta.get("name"), "instance_map": instance_map(p["masks"], p["scores"], threshold).cpu(),
                        "scores": p["scores"].cpu(), "boxes": p["boxes"].cpu()})
        return out

    def _save_pictures(self, stage: str, batch, batch_idx: int, predictions) -> None:
        if self.run_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        threshold = self.settings.inference.overlap_score_threshold
        pictures = []
        for i, number in picture_slots(batch_idx, len(batch["image"]), self.num_pictures):
            p = predictions[i]
            ids = instance_map(p["masks"], p["scores"], threshold).cpu().numpy()
            h, w = batch["image_size"][i].tolist()
            image = to_uint8_image(batch["image"][i, :, :h, :w])
            if image.shape[:2] != ids.shape:
                import cv2
                image = cv2.resize(image, (ids.shape[1], ids.shape[0]), interpolation=cv2.INTER_LINEAR)
            kept = int((p["scores"] >= threshold).sum())
            pictures.append((number, with_caption(enlarge(overlay_masks(image, ids))[0],
                                                  f"{kept} masks (score >= {threshold:g})")))
        save_pictures(self.run_dir, stage, pictures, self.loggers, self.global_step)

    # -------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        solver = self.settings.solver
        return build_optimizer(heads_and_backbone(self.model, self.model.backbone, trainable_only=True),
                               heads_and_backbone_rates(self.optim), self.optim, self.total_steps,
                               algorithm=solver.optimizer, momentum=solver.momentum, milestones=solver)


@torch.no_grad()
def gt_box_locations(outputs: dict[str, torch.Tensor], image: int, boxes: torch.Tensor, strides, sizes_of_interest,
                     center_radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The location that speaks for each ground-truth box: (locations (G,) flat index, scores (G,)).

    boxes (G, 4) xyxy in input pixels of image `image`. Among the locations FCOS assigns to box k
    (`fcos_targets`: centre sampling, the level's size range), the one with the best score
    sqrt(class probability x centre-ness), as inference ranks detections; a box no location is
    assigned to (smaller than a P3 cell) takes the P3 location nearest its centre.
    """
    g = boxes.shape[0]
    scores = torch.sqrt(outputs["cls_logits"][image].sigmoid().amax(-1) * outputs["ctrness"][image].sigmoid())
    if g == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0)
    targets = fcos_targets(outputs["locations"], outputs["levels"], strides, boxes, None, None, sizes_of_interest,
                           center_radius)
    mine = targets.gt_index[None, :] == torch.arange(g, device=boxes.device)[:, None]          # (G, M)
    best, locations = torch.where(mine, scores[None], torch.full_like(mine, -1.0, dtype=scores.dtype)).max(1)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    p3 = torch.nonzero(outputs["levels"] == 0).flatten()
    nearest = p3[torch.cdist(centres, outputs["locations"][p3]).argmin(1)]
    locations = torch.where(best >= 0, locations, nearest)
    return locations, scores[locations]


def to_size(boxes: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """Boxes (K, 4) xyxy in the pixels of an (H, W) = `size` image, rescaled to an `out_size` image."""
    scale = boxes.new_tensor([out_size[1] / size[1], out_size[0] / size[0]]).repeat(2)
    return boxes * scale


def filled_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) bool: pixel (i, j) is on when its centre (j, i) lies in box k (xyxy, pixel-index coordinates)."""
    h, w = size
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])
    return in_y[:, :, None] & in_x[:, None, :]


def instance_map(masks: torch.Tensor, scores: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """(H, W) long id map of masks (K, H, W) with score >= threshold; id k + 1 = mask k, the higher
    score wins where masks overlap."""
    h, w = masks.shape[-2:]
    out = torch.zeros((h, w), dtype=torch.long, device=masks.device)
    keep = torch.nonzero(scores >= threshold).flatten()
    keep = keep[scores[keep].argsort()]
    for k in keep.tolist():  # lowest score first, so the best is painted last
        out[masks[k]] = k + 1
    return out


__all__ = ["BoxInstModule", "select_proposals", "instance_map", "filled_boxes", "gt_box_locations"]
