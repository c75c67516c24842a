"""`generate_instance_map`: point annotations of one image -> one exclusive instance id map.

Pipeline (each step a pure function of this package; docs/dpmo.md explains the choices). Steps
1-4 are `crowdseg.dpmo.scene` (`prepare_scene` + `scene_instance_map`), the same code the RPS
environment (`crowdseg.rl.sam_env`) runs, so DPMO's masks and the RPS reward's masks agree:
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

from crowdseg.choices import check_dpmo_config
from crowdseg.dpmo.scene import prepare_scene, scene_instance_map
from crowdseg.sam.predictor import BatchedSamPredictor


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
    clock = _Clock(predictor.device)
    clock("post_s")
    scene = prepare_scene(predictor, image, points, cfg)
    # one pass over the image: a tile's embedding is dropped once its points are done
    id_map, counts = scene_instance_map(predictor, scene, cfg, clock=clock, on_progress=on_progress,
                                        keep_embeddings=False)
    clock(None)
    n = len(scene.points)
    passes = counts.pop("decoder_passes")
    report = {
        "num_points": n,
        "num_instances": int(n - counts["missing_instances"]),
        **counts,
        "variant": cfg.variant,
        "image_hw": list(scene.image_hw),
        "scale": scene.scale,
        "median_nn_px": scene.median_nn if np.isfinite(scene.median_nn) else None,
        "tiles": len(scene.tiles),
        "tiles_encoded": scene.encoded,
        "tile_overlap_capped": scene.overlap_capped,
        "decoder_passes": passes,
        "timings": {**{k: round(v, 4) for k, v in clock.totals.items()},
                    "total_s": round(time.perf_counter() - start, 4)},
    }
    return id_map, report
