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

Masks never exist at full resolution: each prompt's mask is the (2R+1)^2 pixel grid around it
(`crowdseg.dpmo.prompts.circle_pixels`, R = ceil of the chunk's largest radius), sampled from the
windowed low-res logits (`BatchedSamPredictor.decode`). All prompts of a tile go through one cached
embedding in chunks of `predictor.prompt_chunk`, sorted by radius so a chunk's windows have similar
sizes. Everything runs under `torch.inference_mode`; returned tensors are ordinary (cloned) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crowdseg.dpmo.nnec import nearest_neighbour_distances, nearest_neighbours, nnec_radii
from crowdseg.dpmo.prompts import build_prompts, circle_pixels, window_cells_geometry
from crowdseg.dpmo.resolve import OVERLAPS, claim_pixels, finalize_instances, new_canvas
from crowdseg.dpmo.select import SELECTIONS, select_candidates
from crowdseg.dpmo.tiles import Tile, assign_points, auto_overlap, plan_tiles, tile_scale
from crowdseg.rl.reward import candidate_rewards
from crowdseg.sam.predictor import BatchedSamPredictor, ImageEmbedding, resize_to_input

ENV_SELECTIONS = ("iou",) + SELECTIONS


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

    def __post_init__(self) -> None:
        if self.selection not in ENV_SELECTIONS:
            raise ValueError(f"selection must be one of {ENV_SELECTIONS}, got {self.selection!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}, got {self.overlap!r}")


@dataclass
class Scene:
    """One image prepared for prompting (see `SamEnvironment.prepare`)."""
    image: Tensor                       # (3, H, W) float in [0, 1], on the predictor's device
    points: np.ndarray                  # (N, 2) float64 xy: the predicted points
    radii: np.ndarray                   # (N,) NNEC radii
    neighbours: np.ndarray              # (N, k) nearest other points, -1 = none
    tiles: list[Tile]
    tile_of: np.ndarray                 # (N,) tile owning each point
    embeddings: dict[int, ImageEmbedding] = field(default_factory=dict)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


@dataclass
class PromptMasks:
    """The NNEC-clipped masks of one chunk of B prompts, as pixel grids of side P = 2R + 1."""
    prompts: Tensor                     # (B,) long indices into the prompt list
    mask: Tensor                        # (B, P, P) bool: inside the disc, inside the image, logit > threshold
    logits: Tensor                      # (B, P, P) float: the chosen SAM mask's logits at those pixels
    flat: Tensor                        # (B, P, P) long: row * W + col (clamped; use with `mask`)
    dist2: Tensor                       # (B, P, P) float: squared distance to the prompt
    offsets: Tensor                     # (B, 2) long: (x0, y0) image pixel of grid cell (0, 0)


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
        o = self.options
        h, w = int(image.shape[-2]), int(image.shape[-1])
        pts = (points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points))
        pts = pts.astype(np.float64).reshape(-1, 2)
        radii = nnec_radii(pts, (h, w), o.radius_factor, o.r_min, o.r_max, o.lone_radius)
        neighbours = nearest_neighbours(pts, o.num_negatives)
        nn = nearest_neighbour_distances(pts)
        median_nn = float(np.median(nn)) if len(pts) >= 2 else float("inf")
        scale = tile_scale((h, w), self.predictor.input_size, median_nn, o.target_nn_px, o.max_scale, o.tile)
        overlap = o.tile_overlap if o.tile_overlap is not None else auto_overlap(radii)
        tiles, _ = plan_tiles((h, w), self.predictor.input_size, scale, overlap)
        rows = np.clip(np.round(pts[:, 1]).astype(np.int64), 0, h - 1)
        cols = np.clip(np.round(pts[:, 0]).astype(np.int64), 0, w - 1)
        return Scene(image.detach().to(self.device, torch.float32), pts, radii, neighbours, tiles,
                     assign_points(tiles, rows, cols))

    def embedding(self, scene: Scene, t: int) -> ImageEmbedding:
        """The cached SAM embedding of tile `t` (encoded on first use)."""
        if t not in scene.embeddings:
            x0, y0, x1, y1 = scene.tiles[t].context
            crop = resize_to_input(scene.image[:, y0:y1, x0:x1], scene.tiles[t].resized_hw)
            scene.embeddings[t] = self.predictor.encode(crop)
        return scene.embeddings[t]

    @torch.inference_mode()
    def prompt_masks(self, scene: Scene, prompts: Tensor, owner: Tensor) -> Iterator[PromptMasks]:
        """Decode `prompts` (M, 2) xy pixels, prompt i belonging to point `owner[i]` (M,) long.

        Yields one `PromptMasks` per chunk; every prompt appears in exactly one chunk.
        """
        o, predictor = self.options, self.predictor
        device = self.device
        n = len(scene.points)
        prompt_xy = prompts.detach().cpu().double().numpy().reshape(-1, 2)
        owner_np = owner.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if len(owner_np) and (owner_np.min() < 0 or owner_np.max() >= n):
            raise ValueError(f"owner indices must be in [0, {n}), got [{owner_np.min()}, {owner_np.max()}]")
        all_points = np.concatenate([scene.points, prompt_xy])
        all_radii = np.concatenate([scene.radii, scene.radii[owner_np]])
        all_neighbours = np.concatenate([scene.neighbours, scene.neighbours[owner_np]])
        h, w = scene.image_hw
        prompt_tile = scene.tile_of[owner_np]
        for t, tile in enumerate(scene.tiles):
            mine = np.flatnonzero(prompt_tile == t)
            if len(mine) == 0:
                continue
            mine = mine[np.argsort(all_radii[n + mine], kind="stable")]
            embedding = self.embedding(scene, t)
            for s in range(0, len(mine), predictor.prompt_chunk):
                chunk = mine[s:s + predictor.prompt_chunk]
                index = n + chunk
                built = build_prompts(all_points, all_radii, all_neighbours, index, tile, predictor.patch,
                                      predictor.embed_size, o.context_factor, o.box_prompt)
                logits, iou = predictor.decode(embedding, built.coords, built.labels, built.origins, built.cells,
                                               built.boxes, None, o.multimask)
                p_b = torch.from_numpy(all_points[index]).to(device)
                r_b = torch.from_numpy(all_radii[index]).to(device)
                if o.selection == "iou":
                    best = iou.argmax(1)
                else:
                    inside, valid = window_cells_geometry(p_b, r_b, tile, built.origins, built.cells, predictor.patch)
                    best, _ = select_candidates(logits, iou, inside, valid, o.selection, o.mask_threshold)
                chosen = logits[torch.arange(len(best), device=logits.device), best]           # (B, S, S)
                pix = circle_pixels(p_b, r_b, tile, (h, w), built.origins, built.cells, predictor.patch)
                sampled = F.grid_sample(chosen[:, None], pix.grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)[:, 0]                             # (B, P, P)
                big = (pix.flat.shape[-1] - 1) // 2
                offsets = p_b.round().long() - big
                yield PromptMasks(torch.from_numpy(chunk).to(device), pix.valid & (sampled > o.mask_threshold),
                                  sampled, pix.flat, pix.dist2, offsets)

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
        """
        n = len(scene.points)
        h, w = scene.image_hw
        chosen_xy = torch.from_numpy(scene.points).float() if chosen is None else chosen.detach().float()
        if chosen_xy.shape != (n, 2):
            raise ValueError(f"chosen must be ({n}, 2), got {tuple(chosen_xy.shape)}")
        with torch.inference_mode():
            best, owner_canvas = new_canvas(h * w, self.device)
            owner = torch.arange(n, device=self.device)
            for chunk in self.prompt_masks(scene, chosen_xy.to(self.device), owner):
                priority = chunk.logits if self.options.overlap == "logit" else -chunk.dist2
                ids = (chunk.prompts + 1)[:, None, None].expand_as(chunk.mask)
                claim_pixels(best, owner_canvas, chunk.flat[chunk.mask], priority[chunk.mask], ids[chunk.mask])
            canvas = owner_canvas.view(h, w).cpu().numpy()
        return finalize_instances(canvas, chosen_xy.cpu().double().numpy(), scene.radii,
                                  self.options.fallback_radius_factor)
