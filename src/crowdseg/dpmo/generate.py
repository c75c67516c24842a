"""`generate_instance_map`: point annotations of one image -> one exclusive instance id map.

Pipeline (each step a pure function of this package; docs/dpmo.md explains the choices):
1. `nnec_radii`: one exclusive circle per point; `nearest_neighbours` for negative prompts.
2. `tile_scale` + `plan_tiles`: one tile, or overlapping tiles so a median head gap spans
   `target_nn_px` SAM input pixels; each point is owned by one tile.
3. Per tile: resize the context and compute the image embedding once. Per chunk of
   `prompt_chunk` owned points (sorted by radius, so windows of a chunk have similar sizes):
   `build_prompts` -> SAM decode (windowed logits, see crowdseg/sam/predictor.py) ->
   `select_candidates` -> sample the chosen logits at the pixels of the circle (clipped to it) ->
   `claim_pixels` on an image-wide canvas (the overlap rule). EDP-SAM (`variant: edp_sam`)
   decodes a second time with the exclusion mask prompt (`exclusion_mask_prompt`) and keeps that
   mask; with `edp_dense_prompt: disc` it decodes once, with the circle itself as the mask prompt.
4. `finalize_instances`: fallback discs for empty instances, every point owns its own pixel.

The id map has 0 for background and k for the instance of point k-1 (uint16, int32 beyond 65535
points); nothing of size N x H x W is ever allocated.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from crowdseg.dpmo.nnec import nearest_neighbour_distances, nearest_neighbours, nnec_radii
from crowdseg.dpmo.prompts import build_prompts, circle_pixels, exclusion_mask_prompt, window_cells_geometry
from crowdseg.dpmo.resolve import OVERLAPS, claim_pixels, finalize_instances, new_canvas
from crowdseg.dpmo.select import SELECTIONS, select_candidates
from crowdseg.dpmo.tiles import assign_points, auto_overlap, plan_tiles, tile_scale
from crowdseg.errors import ConfigError
from crowdseg.sam.predictor import BatchedSamPredictor, resize_to_input

VARIANTS = ("dpmo", "edp_sam")
EDP_DENSE_PROMPTS = ("selected", "disc")


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


class _Clock:
    """Wall time per phase; synchronises CUDA so the split is honest."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.totals = {"encoder_s": 0.0, "decoder_s": 0.0, "post_s": 0.0}
        self._phase, self._start = None, 0.0

    def __call__(self, phase: str | None) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._phase is not None:
            self.totals[self._phase] += now - self._start
        self._phase, self._start = phase, now


@torch.inference_mode()
def generate_instance_map(predictor: BatchedSamPredictor, image: torch.Tensor, points: Any, cfg: Any,
                          on_progress: Optional[Callable[[int], object]] = None,
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """Exclusive instance id map of `image` from its `points`.

    image: (3, H, W) float RGB in [0, 1]; points: (N, 2) xy in pixels (tensor or array);
    cfg: the `dpmo` config section (DpmoConfig or its DictConfig); on_progress: called with the
    number of points just finished after every prompt chunk (e.g. a progress bar's `update`).
    Returns the id map (H, W) uint16 (int32 beyond 65535 points; 0 = background, k = point k-1)
    and a report: counts (instances, empty fallbacks, ...), tiling, timings.
    """
    check_dpmo_config(cfg)
    start = time.perf_counter()
    device = predictor.device
    clock = _Clock(device)
    clock("post_s")
    h, w = int(image.shape[-2]), int(image.shape[-1])
    pts = (points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)).astype(np.float64).reshape(-1, 2)
    n = len(pts)
    radii = nnec_radii(pts, (h, w), cfg.radius_factor, cfg.r_min, cfg.r_max, cfg.lone_radius)
    neighbours = nearest_neighbours(pts, cfg.num_negatives)
    nn = nearest_neighbour_distances(pts)
    median_nn = float(np.median(nn)) if n >= 2 else float("inf")
    scale = tile_scale((h, w), predictor.input_size, median_nn, cfg.target_nn_px, cfg.max_scale, cfg.tile)
    overlap = cfg.tile_overlap if cfg.tile_overlap is not None else auto_overlap(radii)
    tiles, overlap_capped = plan_tiles((h, w), predictor.input_size, scale, overlap)
    rows = np.clip(np.round(pts[:, 1]).astype(np.int64), 0, h - 1)
    cols = np.clip(np.round(pts[:, 0]).astype(np.int64), 0, w - 1)
    tile_of = assign_points(tiles, rows, cols)

    best, owner = new_canvas(h * w, device)
    pts_dev = torch.from_numpy(pts).to(device)
    radii_dev = torch.from_numpy(radii).to(device)
    encoded, passes = 0, 0
    for t, tile in enumerate(tiles):
        owned = np.flatnonzero(tile_of == t)
        if len(owned) == 0:
            continue
        owned = owned[np.argsort(radii[owned], kind="stable")]
        x0, y0, x1, y1 = tile.context
        crop = resize_to_input(image[:, y0:y1, x0:x1].to(device, torch.float32), tile.resized_hw)
        clock("encoder_s")
        embedding = predictor.encode(crop)
        encoded += 1
        for s in range(0, len(owned), predictor.prompt_chunk):
            index = owned[s:s + predictor.prompt_chunk]
            clock("post_s")
            prompts = build_prompts(pts, radii, neighbours, index, tile, predictor.patch, predictor.embed_size,
                                    cfg.context_factor, cfg.box_prompt)
            p_b, r_b = pts_dev[index], radii_dev[index]
            inside, valid = window_cells_geometry(p_b, r_b, tile, prompts.origins, prompts.cells, predictor.patch,
                                                  cfg.context_factor)
            logits, passes_here = _decode_chunk(predictor, embedding, prompts, inside, valid, cfg, clock)
            passes += passes_here
            clock("post_s")
            pix = circle_pixels(p_b, r_b, tile, (h, w), prompts.origins, prompts.cells, predictor.patch)
            sampled = F.grid_sample(logits[:, None], pix.grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)[:, 0]                       # (B, P, P)
            claim = pix.valid & (sampled > cfg.mask_threshold)
            priority = sampled if cfg.overlap == "logit" else -pix.dist2
            ids = torch.from_numpy(index + 1).to(device)[:, None, None].expand_as(claim)
            claim_pixels(best, owner, pix.flat[claim], priority[claim], ids[claim])
            if on_progress is not None:
                on_progress(len(index))

    clock("post_s")
    id_map, counts = finalize_instances(owner.view(h, w).cpu().numpy(), pts, radii, cfg.fallback_radius_factor)
    clock(None)
    report = {
        "num_points": n,
        "num_instances": int(n - counts["missing_instances"]),
        **counts,
        "variant": cfg.variant,
        "image_hw": [h, w],
        "scale": scale,
        "median_nn_px": median_nn if np.isfinite(median_nn) else None,
        "tiles": len(tiles),
        "tiles_encoded": encoded,
        "tile_overlap_capped": overlap_capped,
        "decoder_passes": passes,
        "timings": {**{k: round(v, 4) for k, v in clock.totals.items()},
                    "total_s": round(time.perf_counter() - start, 4)},
    }
    return id_map, report


def _decode_chunk(predictor: BatchedSamPredictor, embedding, prompts, inside: torch.Tensor, valid: torch.Tensor,
                  cfg: Any, clock: _Clock) -> tuple[torch.Tensor, int]:
    """Chosen window logits (B, S, S) of one chunk and the number of decoder passes it took."""
    def decode(mask_input=None, multimask=cfg.multimask):
        clock("decoder_s")
        out = predictor.decode(embedding, prompts.coords, prompts.labels, prompts.origins, prompts.cells,
                               prompts.boxes, mask_input, multimask)
        clock("post_s")
        return out

    def choose(logits, iou):
        best, _ = select_candidates(logits, iou, inside, valid, cfg.selection, cfg.mask_threshold)
        return logits[torch.arange(len(best), device=logits.device), best]

    if cfg.variant == "edp_sam" and cfg.edp_dense_prompt == "disc":
        prompt = exclusion_mask_prompt(inside, prompts.origins, predictor.low_res_size, cfg.dense_prompt_logit)
        return choose(*decode(prompt)), 1
    first = choose(*decode())
    if cfg.variant == "dpmo":
        return first, 1
    prompt = exclusion_mask_prompt(inside, prompts.origins, predictor.low_res_size, cfg.dense_prompt_logit, first)
    logits, _ = decode(prompt, multimask=False)
    return logits[:, 0], 2
