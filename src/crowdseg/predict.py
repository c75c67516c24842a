"""`crowdseg predict`: per-image predictions written to disk.

For every image, `<out>/<stem>.json` holds the count and, for point methods, the points (xy in
pixels of the original image) with their scores; methods that make instance maps (rps) also write
`<stem>.png` (16-bit ids, id k = point k-1, at the resolution the model saw). `<stem>_overlay.png`
shows the prediction on the image, at the resolution the model saw: the predicted points as red
crosses, a density map as a blended heat map, instance maps as blended colours. Each file is
written atomically. `summary.json` lists the images and their counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from crowdseg.io import write_json_atomic
from crowdseg.vis import PRED_COLOR, draw_points, heatmap, overlay_masks, save_png, to_uint8_image
from datamodules.readers.idmaps import mask_stem, write_id_map_png


def prediction_record(item: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of one image's prediction; points are mapped back to the original image."""
    scale = float(meta.get("scale", 1.0)) or 1.0
    record: dict[str, Any] = {"name": item.get("name") or meta.get("name"),
                              "orig_size": list(meta.get("orig_size", ()))}
    if "points" in item:
        points = item["points"].float() / scale
        record.update(count=int(len(points)), points=points.tolist())
        if "scores" in item:
            record["scores"] = [round(float(s), 4) for s in item["scores"]]
        if "original_points" in item:
            record["proposer_points"] = (item["original_points"].float() / scale).tolist()
    if "count" in item:
        record["count"] = float(item["count"])
    return record


def density_cells(density: torch.Tensor, size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """The cells of a density map (h, w) of a zero-padded batch image of size `padded` (H, W) that
    cover the image's own `size` (H, W)."""
    rows = -(-size[0] * density.shape[-2] // padded[0])
    cols = -(-size[1] * density.shape[-1] // padded[1])
    return density[..., :rows, :cols]


def prediction_overlay(image: torch.Tensor, item: dict[str, Any], padded: Optional[tuple[int, int]] = None,
                       alpha: float = 0.5) -> Optional[np.ndarray]:
    """(H, W, 3) uint8 RGB picture of one image's prediction, the size of `image` (3, H, W): its
    instance map and density heat map blended in, its points (in `image` pixels) as red crosses;
    None when the prediction has none of these. `padded`: the batch's padded (H, W), which the
    density map covers (default: the image's own size)."""
    canvas = to_uint8_image(image)
    drawn = False
    ids = item.get("instance_map")
    if ids is not None:
        ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if ids.shape == canvas.shape[:2]:
            canvas, drawn = overlay_masks(canvas, ids), True
    if item.get("density") is not None:
        cells = density_cells(item["density"].float().cpu(), canvas.shape[:2], padded or canvas.shape[:2])
        heat = heatmap(cells.numpy(), canvas.shape[:2])
        canvas, drawn = ((1 - alpha) * canvas + alpha * heat).round().astype(np.uint8), True
    if "points" in item:
        radius = max(2, round(max(canvas.shape[:2]) / 256))
        canvas, drawn = draw_points(canvas, item["points"], PRED_COLOR, radius=radius, cross=True), True
    return canvas if drawn else None


class PredictionWriter(BasePredictionWriter):
    """Writes `<stem>.json`, `<stem>_overlay.png` (and `<stem>.png` instance maps) for every predicted image."""

    def __init__(self, out_dir: Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.counts: dict[str, float] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        padded = tuple(batch["image"].shape[-2:])
        for i, (item, meta) in enumerate(zip(prediction, batch["meta"])):
            record = prediction_record(item, meta)
            stem = mask_stem(record["name"])
            if item.get("instance_map") is not None:
                id_map = item["instance_map"]
                id_map = id_map.numpy() if isinstance(id_map, torch.Tensor) else np.asarray(id_map)
                write_id_map_png(self.out_dir / f"{stem}.png", id_map)
                record["instance_map"] = f"{stem}.png"
            h, w = batch["image_size"][i].tolist()
            overlay = prediction_overlay(batch["image"][i, :, :h, :w], item, padded)
            if overlay is not None:
                save_png(self.out_dir / f"{stem}_overlay.png", overlay)
                record["overlay"] = f"{stem}_overlay.png"
            write_json_atomic(self.out_dir / f"{stem}.json", record)
            self.counts[record["name"]] = record.get("count")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_json_atomic(self.out_dir / "summary.json", {"images": len(self.counts), "counts": self.counts})


def folder_dataset(cfg, images: str | Path):
    """The images of a folder, whole, resized as the run's data config says (`data.max_size`); an
    unreadable image fails or is left out as `data.on_bad_annotation` says."""
    from datamodules.dataset import build_dataset

    return build_dataset("folder", str(images), "all", max_size=cfg.data.max_size, progress=False,
                         on_bad_annotation=cfg.data.on_bad_annotation)


__all__ = ["PredictionWriter", "prediction_record", "prediction_overlay", "density_cells", "folder_dataset"]
