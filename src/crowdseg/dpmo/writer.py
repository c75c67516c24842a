"""`crowdseg masks <experiment.yaml>`: instance masks for a whole dataset split, resumably.

The split is run through Lightning's predict loop (`Trainer.predict`), so the same command runs
on one device or many (`trainer.devices`, `trainer.strategy=ddp`): Lightning gives every image
to exactly one rank (its predict sampler does not repeat samples). Per image, in `out_dir`
(default `<runs_root>/<name>/masks/<split>`, one folder per split because file stems repeat
across splits, e.g. ShanghaiTech's IMG_1 in train and test):

- `<stem>.png`: 16-bit id map (0 background, k the instance of point k-1), the image's size;
- `overlays/<stem>.jpg` (with `dpmo.overlays`): the image with coloured masks and its points;
- `<stem>.json`: summary (instances, empty fallbacks, tiling, timings), written *last*.

Every file is written atomically; an image counts as done when its PNG and JSON exist, so a
rerun skips finished images and a killed job resumes where it stopped. Temporary files a killed
job left behind are removed at the start of the next run. `settings.yaml` records what shapes the
masks; a rerun with other such settings makes every image again.

The job runs on the machinery of training: the folder is prepared like a run directory
(`crowdseg.runs.prepare_run_dir`), stale temporaries go with `crowdseg.io.remove_stale_temporaries`,
settings are compared with `crowdseg.runs.config_differences`, and the Trainer is
`crowdseg.train.build_trainer` without a run's records (no loggers, no checkpoints).

Images are fed whole with their points (batch size 1, no crop). If the dataset resized an image
(meta `orig_size` differs from the tensor), the id map is resized back with nearest neighbour.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from crowdseg.dpmo.generate import check_dpmo_config, generate_instance_map
from crowdseg.errors import DataError
from crowdseg.io import atomic_path, remove_stale_temporaries, write_json_atomic, write_text_atomic
from crowdseg.methods.base import Job
from crowdseg.runs import config_differences
from crowdseg.sam.build import build_sam_from_config
from crowdseg.sam.predictor import BatchedSamPredictor
from datamodules.readers.idmaps import MAX_PNG_ID, mask_stem, write_id_map_png


def masks_dir(cfg: DictConfig) -> Path:
    """Where `crowdseg masks` writes: `dpmo.out_dir`, else `<runs_root>/<name>/masks/<split>`."""
    if cfg.dpmo.out_dir:
        return Path(cfg.dpmo.out_dir)
    return Path(cfg.runs_root) / cfg.name / "masks" / cfg.dpmo.split


SETTINGS_FILE = "settings.yaml"  # not *.json: those are the finished-image markers
NOT_SHAPING = ("out_dir", "overlays", "split")  # dpmo keys that do not change a mask


def mask_settings(cfg: DictConfig) -> dict[str, Any]:
    """What shapes the masks of a run: the SAM model (type, checkpoint and its sha256, init seed),
    the `dpmo` settings and the image resizing."""
    import hashlib

    sam = cfg.sam
    digest = None
    if sam.checkpoint:
        h = hashlib.sha256()
        with open(sam.checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        digest = h.hexdigest()
    dpmo = {k: v for k, v in OmegaConf.to_container(cfg.dpmo, resolve=True).items() if k not in NOT_SHAPING}
    return {"sam": {"model_type": sam.model_type, "checkpoint": sam.checkpoint, "checkpoint_sha256": digest,
                    "seed": sam.seed if not sam.checkpoint else None},
            "dpmo": dpmo, "data": {"name": cfg.data.name, "max_size": cfg.data.max_size}}


def settle_settings(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Make `out_dir` hold masks of `settings`: when its `settings.yaml` records other settings (the
    differences of `crowdseg.runs.config_differences`, as between runs), the finished-image markers
    (`<stem>.json`) are removed, so every image is made again. Returns the differing keys (empty when
    the folder is new or up to date)."""
    import yaml

    path = out_dir / SETTINGS_FILE
    markers = list(out_dir.glob("*.json"))
    if path.is_file():
        changed = list(config_differences(yaml.safe_load(path.read_text()) or {}, settings))
    else:
        changed = ["(masks made before settings were recorded)"] if markers else []
    if changed:
        for marker in markers:
            marker.unlink()
    if changed or not path.is_file():
        write_text_atomic(path, yaml.safe_dump(settings, sort_keys=True))
    return changed


def is_done(out_dir: Path, stem: str) -> bool:
    return (out_dir / f"{stem}.json").is_file() and (out_dir / f"{stem}.png").is_file()


def image_stem(meta: dict, index: int) -> str:
    name = meta.get("name")
    return mask_stem(name) if name else f"{index:06d}"


def check_unique_stems(names: list[str], out_dir: Path) -> None:
    """Two images of one run must not share a mask file (e.g. `a.jpg` and `a.png`)."""
    seen: dict[str, str] = {}
    for name in names:
        stem = mask_stem(name)
        if stem in seen:
            raise DataError(f"images {seen[stem]!r} and {name!r} would both write {out_dir / stem}.png; "
                            "rename one of them or generate their masks in separate runs")
        seen[stem] = name


class MaskGenerator(L.LightningModule):
    """Predict step = `generate_instance_map` for each image of the batch (skipping finished ones)."""

    def __init__(self, sam: nn.Module, dpmo: Any, prompt_chunk: int, out_dir: Path, keep_images: bool = False):
        super().__init__()
        self.sam = sam
        self.dpmo = dpmo
        self.prompt_chunk = prompt_chunk
        self.out_dir = Path(out_dir)
        self.keep_images = keep_images

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        predictor = BatchedSamPredictor(self.sam, self.prompt_chunk)
        results = []
        for i, meta in enumerate(batch["meta"]):
            meta = meta if isinstance(meta, dict) else {}
            stem = image_stem(meta, batch_idx)
            name = meta.get("name", stem)
            if is_done(self.out_dir, stem):
                results.append({"stem": stem, "skipped": True})
                continue
            h, w = (int(v) for v in batch["image_size"][i])
            image = batch["image"][i, :, :h, :w]
            points = batch["points"][i]
            if len(points) > MAX_PNG_ID:
                raise DataError(f"{name}: {len(points)} points do not fit a 16-bit id map (at most {MAX_PNG_ID})")
            with tqdm(total=len(points), desc=f"heads of {name}", unit="head", leave=False,
                      disable=not self._show_heads()) as bar:
                id_map, report = generate_instance_map(predictor, image, points, self.dpmo, on_progress=bar.update)
            orig = tuple(int(v) for v in meta.get("orig_size", (h, w)))
            if orig != (h, w):
                id_map = cv2.resize(id_map, (orig[1], orig[0]), interpolation=cv2.INTER_NEAREST)
                report["resized_to"] = list(orig)
            report.update(name=name, dataset=meta.get("dataset"))
            results.append({"stem": stem, "id_map": id_map, "report": report,
                            "image": image.cpu() if self.keep_images else None,
                            "points": points.cpu() if self.keep_images else None})
        return results

    def _show_heads(self) -> bool:
        """A second bar over the heads of the current image (a dense image can take minutes)."""
        return self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero


class MaskWriter(BasePredictionWriter):
    """Writes each prediction of `MaskGenerator` as PNG (+ overlay) + JSON, atomically."""

    def __init__(self, out_dir: Path, overlays: bool = False, extra: Optional[dict] = None):
        super().__init__(write_interval="batch")
        self.out_dir, self.overlays, self.extra = Path(out_dir), overlays, extra or {}
        self.written, self.skipped = 0, 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for item in prediction:
            if item.get("skipped"):
                self.skipped += 1
                continue
            report = {**item["report"], **self.extra, "rank": trainer.global_rank, "world_size": trainer.world_size}
            write_mask_outputs(self.out_dir, item["stem"], item["id_map"], report,
                               item["image"] if self.overlays else None, item["points"])
            self.written += 1


def write_mask_outputs(out_dir: Path, stem: str, id_map: np.ndarray, report: dict,
                       image: Optional[torch.Tensor] = None, points: Optional[torch.Tensor] = None) -> None:
    """`<stem>.png` (uint16 ids), optional `overlays/<stem>.jpg`, then `<stem>.json`, each atomic."""
    write_id_map_png(out_dir / f"{stem}.png", id_map)       # the format datamodules' readers load
    if image is not None:
        with atomic_path(out_dir / "overlays" / f"{stem}.jpg", suffix=".jpg") as tmp:
            if not cv2.imwrite(str(tmp), overlay_picture(image, id_map, points)[..., ::-1].copy()):
                raise OSError(f"could not write overlay of {stem}")
    write_json_atomic(out_dir / f"{stem}.json", report)


def overlay_picture(image: torch.Tensor, id_map: np.ndarray, points: Optional[torch.Tensor] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the image with coloured instances, their outlines and the points."""
    from crowdseg.vis import draw_points, enlarge, overlay_masks, to_uint8_image
    rgb = to_uint8_image(image)
    ids = id_map.astype(np.int64)
    if ids.shape != rgb.shape[:2]:
        ids = cv2.resize(id_map, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    out = overlay_masks(rgb, ids, alpha=0.55)
    edge = np.zeros(ids.shape, bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[edge & (ids > 0)] = (255, 255, 255)
    out, factor = enlarge(out)
    if points is not None and len(points):
        out = draw_points(out, points, (255, 0, 0), radius=max(1, factor), scale=factor)
    return out


def masks_job(cfg: DictConfig, out_dir: Path) -> Job:
    """The module (`MaskGenerator`: SAM and the `dpmo` settings) and data (the `dpmo.split` images with
    their points, whole, one at a time) of `crowdseg masks`."""
    from crowdseg.data import build_dataset
    from datamodules.crowd import CrowdDataModule

    # the masks are being made: read the images and points only, never attach existing masks
    dataset = build_dataset(OmegaConf.merge(cfg, {"data": {"masks_dir": None}}), cfg.dpmo.split)
    check_unique_stems([r.name for r in getattr(dataset, "records", [])], out_dir)
    sam = build_sam_from_config(cfg.sam)
    dpmo = OmegaConf.create(OmegaConf.to_container(cfg.dpmo, resolve=True))
    module = MaskGenerator(sam, dpmo, cfg.sam.prompt_chunk, out_dir, keep_images=cfg.dpmo.overlays)
    return Job(module, CrowdDataModule(predict=dataset, eval_batch_size=1, num_workers=cfg.data.num_workers))


def run_masks(cfg: DictConfig) -> dict[str, Any]:
    """Generate instance masks for the `dpmo.split` split of the configured dataset (the steps are
    training's; see the module docstring).

    Returns out_dir, images (in the split), written and skipped (summed over all ranks) and
    masks_on_disk (finished images in out_dir).
    """
    from crowdseg.runs import is_global_zero, prepare_run_dir
    from crowdseg.train import build_trainer

    check_dpmo_config(cfg.dpmo)
    out_dir = prepare_run_dir(cfg, write_config=False, path=masks_dir(cfg),
                              key="dpmo.out_dir" if cfg.dpmo.out_dir else "runs_root")
    if is_global_zero():
        remove_stale_temporaries(out_dir, out_dir / "overlays")
    job = masks_job(cfg, out_dir)  # checks sam.checkpoint before it is hashed below
    if is_global_zero():
        changed = settle_settings(out_dir, mask_settings(cfg))
        if changed:
            print(f"[crowdseg] {out_dir} holds masks made with other settings ({', '.join(changed[:6])}): "
                  f"making every image again", flush=True)
    writer = MaskWriter(out_dir, cfg.dpmo.overlays, extra={"sam_model_type": cfg.sam.model_type,
                                                           "split": cfg.dpmo.split})
    trainer = build_trainer(cfg, out_dir, job, [writer], records=False)
    trainer.predict(job.module, datamodule=job.datamodule, return_predictions=False)
    # Totals over all ranks: with DDP every image is written by exactly one of them.
    counts = torch.tensor([writer.written, writer.skipped], dtype=torch.float64, device=trainer.strategy.root_device)
    written, skipped = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
    return {"out_dir": str(out_dir), "images": len(job.datamodule.dataset("predict")), "written": written,
            "skipped": skipped,
            "masks_on_disk": sum(1 for p in out_dir.glob("*.json") if (p.with_suffix(".png")).is_file())}

