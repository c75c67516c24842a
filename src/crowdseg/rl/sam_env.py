"""A frozen SAM as the RPS environment: NNEC-clipped masks for arbitrary prompt points, their rewards,
and the exclusive instance map of the chosen points (METHODS.md D2).

An image is *prepared* once (`SamEnvironment.prepare`): the NNEC radius and the nearest neighbours of
each predicted point, the tiling (the DPMO rules, `crowdseg.dpmo.tiles`), and one cached SAM image
embedding per tile, computed on first use. Any number of *prompt points* can then be decoded against
it; prompt i belongs to point `owner[i]` and is prompted like DPMO prompts that point:

- a positive point at the prompt (a candidate c_nk instead of p_n), negatives at the *predicted*
  neighbours of p_n (label 0; padding where absent), optionally the box of its circle;
- SAM's multimask output, one mask picked per prompt: `selection` "iou" takes the highest predicted
  IoU (METHODS.md D2); "iou_inside" / "disc_iou" use DPMO's circle-aware rules (`select_candidates`);
- the mask is clipped to the prompt's NNEC disc: centred on the prompt, radius r_n of its point (so a
  candidate and, at inference, the selected point carry their own circle; training reward and
  inference mask are the same function of the chosen point).

Preparing and decoding are `crowdseg.dpmo.scene`, the code `crowdseg masks` runs: for the same points
and options, `instance_map` here and the mask files DPMO writes are the same. Masks never exist at full
resolution: each prompt's mask is the (2R+1)^2 pixel grid around it
(`crowdseg.dpmo.prompts.circle_pixels`, R = ceil of the chunk's largest radius), sampled from the
windowed low-res logits (`BatchedSamPredictor.decode`). All prompts of a tile go through one cached
embedding in chunks of `predictor.prompt_chunk`, sorted by radius so a chunk's windows have similar
sizes. Everything runs under `torch.inference_mode`; returned tensors are ordinary (cloned) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from crowdseg.choices import EDP_DENSE_PROMPTS, OVERLAPS, PROMPT_SELECTIONS, VARIANTS
from crowdseg.dpmo.scene import (PromptMasks, Scene, decode_prompts, prepare_scene, scene_instance_map,
                                 tile_embedding)
from crowdseg.rl.reward import candidate_rewards
from crowdseg.sam.predictor import BatchedSamPredictor, ImageEmbedding


@dataclass(frozen=True)
class EnvOptions:
    """How prompts are built and masks are cut; the names and defaults follow `DpmoConfig`."""
    radius_factor: float = 1.0
    r_min: float = 3.0
    r_max: Optional[float] = None
    lone_radius: Optional[float] = None
    num_negatives: int = 3
    box_prompt: bool = False
    multimask: bool = True
    selection: str = "iou"              # iou (SAM's predicted IoU) | iou_inside | disc_iou
    mask_threshold: float = 0.0
    context_factor: float = 2.0
    overlap: str = "logit"              # instance map: a pixel claimed twice goes to logit | nearest
    fallback_radius_factor: float = 0.5
    tile: bool = True
    target_nn_px: float = 24.0
    max_scale: float = 4.0
    tile_overlap: Optional[int] = None
    variant: str = "dpmo"               # dpmo | edp_sam (adds DPMO's exclusion-circle mask prompt)
    edp_dense_prompt: str = "selected"  # edp_sam mask prompt: selected (refine pass) | disc (one pass)
    dense_prompt_logit: float = 8.0

    def __post_init__(self) -> None:
        for key, allowed in (("selection", PROMPT_SELECTIONS), ("overlap", OVERLAPS), ("variant", VARIANTS),
                             ("edp_dense_prompt", EDP_DENSE_PROMPTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")


class SamEnvironment:
    """Frozen SAM + NNEC: `prepare` an image, then `prompt_masks`, `rewards` or `instance_map`."""

    def __init__(self, predictor: BatchedSamPredictor, options: EnvOptions = EnvOptions()):
        self.predictor = predictor
        self.options = options

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def prepare(self, image: Tensor, points: Tensor | np.ndarray) -> Scene:
        """image: (3, H, W) float RGB in [0, 1]; points: (N, 2) xy pixels (the predicted points)."""
        return prepare_scene(self.predictor, image, points, self.options)

    def embedding(self, scene: Scene, t: int) -> ImageEmbedding:
        """The cached SAM embedding of tile `t` (encoded on first use)."""
        return tile_embedding(self.predictor, scene, t)

    def prompt_masks(self, scene: Scene, prompts: Tensor, owner: Tensor) -> Iterator[PromptMasks]:
        """Decode `prompts` (M, 2) xy pixels, prompt i belonging to point `owner[i]` (M,) long.

        Yields one `PromptMasks` per chunk; every prompt appears in exactly one chunk.
        """
        return decode_prompts(self.predictor, scene, prompts, owner, self.options)

    def rewards(self, scene: Scene, candidates: Tensor, matched: Tensor, instance_map: Tensor,
                unmatched_reward: float = 0.0, distance_weight: float = 0.0,
                gt_points: Optional[Tensor] = None) -> Tensor:
        """Reward (N, K) of every candidate (N, K, 2) of the scene's N points (`candidate_rewards`).

        matched: (N,) GT index of each point or -1; instance_map: (H, W) long GT id map.
        """
        n, k = candidates.shape[:2]
        if n != len(scene.points):
            raise ValueError(f"{n} candidate groups for a scene of {len(scene.points)} points")
        device = self.device
        if n * k == 0:
            return torch.zeros((n, k), dtype=torch.float32, device=device)
        flat_candidates = candidates.reshape(-1, 2).to(device, torch.float32)
        owner = torch.arange(n, device=device).repeat_interleave(k)
        matched = matched.to(device).long()
        radii = torch.from_numpy(scene.radii).to(device, torch.float32)
        gt = gt_points.to(device) if gt_points is not None else None
        with torch.inference_mode():
            out = torch.zeros(n * k, dtype=torch.float32, device=device)
            id_map = instance_map.to(device)
            for chunk in self.prompt_masks(scene, flat_candidates, owner):
                rows = chunk.prompts
                owners = owner[rows]
                values = candidate_rewards(chunk.mask[:, None], matched[owners], id_map, chunk.offsets[:, None],
                                           unmatched_reward, distance_weight,
                                           flat_candidates[rows][:, None], gt, radii[owners])
                out[rows] = values[:, 0]
        return out.view(n, k).clone()

    def instance_map(self, scene: Scene, chosen: Optional[Tensor] = None) -> tuple[np.ndarray, dict]:
        """Exclusive id map (H, W) of the scene's points, each prompted at `chosen` (N, 2) (default: itself).

        Overlaps go to the highest logit or the nearest prompt (`overlap`); empty instances get DPMO's
        fallback disc; every chosen point owns its pixel (`finalize_instances`). Instance k is point k-1.
        The same function `crowdseg masks` runs (`crowdseg.dpmo.scene.scene_instance_map`).
        """
        id_map, counts = scene_instance_map(self.predictor, scene, self.options, chosen)
        counts.pop("decoder_passes")
        return id_map, counts
