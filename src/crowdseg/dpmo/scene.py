"""The one point-to-mask path: prepare an image for prompting, decode prompts, build the id map.

`crowdseg masks` (`generate_instance_map`) and the RPS environment (`crowdseg.rl.sam_env`) both run
these functions, so a mask written by DPMO and the mask the RPS reward scores for the same point
are the same function of the same inputs.

1. `prepare_scene`: the NNEC radius and the nearest neighbours of each point, the tiling
   (`tile_scale` + `plan_tiles`; each point owned by the tile whose core holds its pixel). Tile
   embeddings are computed on first use (`tile_embedding`) and cached in the scene.
2. `decode_prompts`: any number of prompt points, prompt i belonging to point `owner[i]` and
   prompted like DPMO prompts that point (positive at the prompt, negatives at the point's
   neighbours, optionally its circle's box; the point's radius). Per tile, in chunks of
   `predictor.prompt_chunk` sorted by radius: `build_prompts` -> windowed SAM decode -> one
   candidate per prompt (`choose_candidates`; EDP-SAM adds its mask-prompt pass) -> the chosen
   logits sampled on the (2R + 1)^2 pixel grid around the prompt, clipped to its NNEC disc.
3. `scene_instance_map`: every point prompted once (at itself, or at a chosen position), the
   masks claimed on an image-wide canvas (`claim_pixels`) and finished by `finalize_instances`.

`cfg` is any object with the `dpmo` option names (`DpmoConfig`, its DictConfig, `EnvOptions`).
The predictor is a `BatchedSamPredictor` or anything with its interface (input_size, embed_size,
patch, low_res_size, prompt_chunk, device, encode, decode). Nothing of size N x H x W is allocated.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crowdseg.dpmo.nnec import nearest_neighbour_distances, nearest_neighbours, nnec_radii
from crowdseg.dpmo.prompts import Prompts, build_prompts, circle_pixels, exclusion_mask_prompt, window_cells_geometry
from crowdseg.dpmo.resolve import claim_pixels, finalize_instances, new_canvas
from crowdseg.dpmo.select import select_candidates
from crowdseg.dpmo.tiles import Tile, assign_points, auto_overlap, plan_tiles, tile_scale
from crowdseg.geometry import point_pixels
from crowdseg.sam.predictor import ImageEmbedding, resize_to_input


Clock = Callable[[Optional[str]], None]


def _no_clock(phase: Optional[str]) -> None:
    """The default clock: time nothing (`generate_instance_map` passes one that splits the wall time)."""


def as_points(points: Any) -> np.ndarray:
    """(N, 2) float64 xy of a tensor or array of points."""
    array = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    return array.astype(np.float64).reshape(-1, 2)


@dataclass
class Scene:
    """One image prepared for prompting (`prepare_scene`)."""
    image: Tensor                       # (3, H, W) float in [0, 1], on the predictor's device
    points: np.ndarray                  # (N, 2) float64 xy
    radii: np.ndarray                   # (N,) NNEC radii
    neighbours: np.ndarray              # (N, k) nearest other points, -1 = none
    tiles: list[Tile]
    tile_of: np.ndarray                 # (N,) tile owning each point
    scale: float                        # SAM input pixels per image pixel
    median_nn: float                    # median nearest-neighbour distance (inf below two points)
    overlap_capped: bool                # the tile overlap was capped (`plan_tiles`)
    embeddings: dict[int, ImageEmbedding] = field(default_factory=dict)
    encoded: int = 0                    # tile encodings run so far

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
    decoder_passes: int = 1             # SAM decoder calls this chunk took (2 for EDP-SAM's refine pass)


def prepare_scene(predictor: Any, image: Tensor, points: Any, cfg: Any) -> Scene:
    """image: (3, H, W) float RGB in [0, 1]; points: (N, 2) xy pixels (tensor or array)."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    pts = as_points(points)
    radii = nnec_radii(pts, (h, w), cfg.radius_factor, cfg.r_min, cfg.r_max, cfg.lone_radius)
    neighbours = nearest_neighbours(pts, cfg.num_negatives)
    nn = nearest_neighbour_distances(pts)
    median_nn = float(np.median(nn)) if len(pts) >= 2 else float("inf")
    scale = tile_scale((h, w), predictor.input_size, median_nn, cfg.target_nn_px, cfg.max_scale, cfg.tile)
    overlap = cfg.tile_overlap if cfg.tile_overlap is not None else auto_overlap(radii)
    tiles, overlap_capped = plan_tiles((h, w), predictor.input_size, scale, overlap)
    rows, cols = point_pixels(pts, h, w)
    return Scene(image.detach().to(predictor.device, torch.float32), pts, radii, neighbours, tiles,
                 assign_points(tiles, rows, cols), scale, median_nn, overlap_capped)


def tile_embedding(predictor: Any, scene: Scene, t: int, clock: Clock = _no_clock) -> ImageEmbedding:
    """The SAM embedding of tile `t` of `scene`: its context resized and encoded, cached in the scene."""
    if t not in scene.embeddings:
        x0, y0, x1, y1 = scene.tiles[t].context
        crop = resize_to_input(scene.image[:, y0:y1, x0:x1], scene.tiles[t].resized_hw)
        clock("encoder_s")
        scene.embeddings[t] = predictor.encode(crop)
        scene.encoded += 1
        clock("post_s")
    return scene.embeddings[t]


def choose_candidates(logits: Tensor, iou: Tensor, inside: Optional[Tensor], valid: Optional[Tensor],
                      selection: str, threshold: float) -> Tensor:
    """The chosen candidate's window logits (B, S, S) of `logits` (B, C, S, S).

    selection "iou" takes SAM's highest predicted IoU (`iou` (B, C)); the others score the
    candidates against the circle (`select_candidates`, with `inside` / `valid` (B, S, S)).
    """
    if selection == "iou":
        best = iou.argmax(1)
    else:
        best, _ = select_candidates(logits, iou, inside, valid, selection, threshold)
    return logits[torch.arange(len(best), device=logits.device), best]


def decode_chunk(predictor: Any, embedding: ImageEmbedding, prompts: Prompts, p: Tensor, r: Tensor, tile: Tile,
                 cfg: Any, clock: Clock = _no_clock) -> tuple[Tensor, int]:
    """Chosen window logits (B, S, S) of one chunk of prompts at p (B, 2) xy with radii r (B,), and the
    number of decoder passes it took (EDP-SAM: a second pass with the exclusion mask prompt, or one
    pass with the disc as the mask prompt)."""
    variant = cfg.variant
    needs_circle = cfg.selection != "iou" or variant == "edp_sam"
    inside, valid = (window_cells_geometry(p, r, tile, prompts.origins, prompts.cells, predictor.patch,
                                           cfg.context_factor) if needs_circle else (None, None))

    def decode(mask_input=None, multimask=cfg.multimask):
        clock("decoder_s")
        out = predictor.decode(embedding, prompts.coords, prompts.labels, prompts.origins, prompts.cells,
                               prompts.boxes, mask_input, multimask)
        clock("post_s")
        return out

    def choose(logits, iou):
        return choose_candidates(logits, iou, inside, valid, cfg.selection, cfg.mask_threshold)

    if variant == "edp_sam" and cfg.edp_dense_prompt == "disc":
        prompt = exclusion_mask_prompt(inside, prompts.origins, predictor.low_res_size, cfg.dense_prompt_logit)
        return choose(*decode(prompt)), 1
    first = choose(*decode())
    if variant != "edp_sam":
        return first, 1
    prompt = exclusion_mask_prompt(inside, prompts.origins, predictor.low_res_size, cfg.dense_prompt_logit, first)
    logits, _ = decode(prompt, multimask=False)
    return logits[:, 0], 2


@torch.inference_mode()
def decode_prompts(predictor: Any, scene: Scene, prompts: Any, owner: Any, cfg: Any, clock: Clock = _no_clock,
                   keep_embeddings: bool = True) -> Iterator[PromptMasks]:
    """Decode `prompts` (M, 2) xy pixels, prompt i belonging to point `owner[i]` (M,) of the scene.

    Yields one `PromptMasks` per chunk; every prompt appears in exactly one chunk. Prompts go
    tile by tile (the tile of their point), sorted by their point's radius within a tile.
    `keep_embeddings=False` drops a tile's embedding once its prompts are done (one pass over an
    image, as `crowdseg masks` makes); True keeps them for the next call (RPS rollouts).
    """
    device = predictor.device
    n = len(scene.points)
    prompt_xy = as_points(prompts)
    owner_np = (owner.detach().cpu().numpy() if isinstance(owner, Tensor) else np.asarray(owner))
    owner_np = owner_np.astype(np.int64).reshape(-1)
    if len(owner_np) != len(prompt_xy):
        raise ValueError(f"{len(prompt_xy)} prompts but {len(owner_np)} owner indices")
    if len(owner_np) and (owner_np.min() < 0 or owner_np.max() >= n):
        raise ValueError(f"owner indices must be in [0, {n}), got [{owner_np.min()}, {owner_np.max()}]")
    # prompt i sits at row n + i: its own position, its point's radius and negatives
    all_points = np.concatenate([scene.points, prompt_xy])
    all_radii = np.concatenate([scene.radii, scene.radii[owner_np]])
    all_neighbours = np.concatenate([scene.neighbours, scene.neighbours[owner_np]])
    h, w = scene.image_hw
    prompt_tile = scene.tile_of[owner_np]
    chunk_size = predictor.prompt_chunk
    for t, tile in enumerate(scene.tiles):
        mine = np.flatnonzero(prompt_tile == t)
        if len(mine) == 0:
            continue
        mine = mine[np.argsort(all_radii[n + mine], kind="stable")]
        embedding = tile_embedding(predictor, scene, t, clock)
        for s in range(0, len(mine), chunk_size):
            chunk = mine[s:s + chunk_size]
            index = n + chunk
            clock("post_s")
            built = build_prompts(all_points, all_radii, all_neighbours, index, tile, predictor.patch,
                                  predictor.embed_size, cfg.context_factor, cfg.box_prompt)
            p_b = torch.from_numpy(all_points[index]).to(device)
            r_b = torch.from_numpy(all_radii[index]).to(device)
            chosen, passes = decode_chunk(predictor, embedding, built, p_b, r_b, tile, cfg, clock)
            pix = circle_pixels(p_b, r_b, tile, (h, w), built.origins, built.cells, predictor.patch)
            sampled = F.grid_sample(chosen[:, None], pix.grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)[:, 0]                                 # (B, P, P)
            yield PromptMasks(torch.from_numpy(chunk).to(device), pix.valid & (sampled > cfg.mask_threshold),
                              sampled, pix.flat, pix.dist2, pix.offsets, passes)
        if not keep_embeddings:
            scene.embeddings.pop(t, None)


@torch.inference_mode()
def scene_instance_map(predictor: Any, scene: Scene, cfg: Any, chosen: Any = None, clock: Clock = _no_clock,
                       on_progress: Optional[Callable[[int], object]] = None, keep_embeddings: bool = True,
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Exclusive id map (H, W) of the scene's points, each prompted at `chosen` (N, 2) (default: itself).

    A pixel claimed twice goes to the highest logit or the nearest prompt (`cfg.overlap`); empty
    instances get the fallback disc, every chosen point owns its pixel (`finalize_instances`).
    Instance k is point k-1 (uint16, int32 beyond 65535 points). on_progress: called with the number
    of points just finished after every chunk. Returns the map and counts (`finalize_instances`'
    plus `decoder_passes`).
    """
    n = len(scene.points)
    h, w = scene.image_hw
    if chosen is not None and tuple(np.shape(chosen)) != (n, 2):
        raise ValueError(f"chosen must be ({n}, 2), got {tuple(np.shape(chosen))}")
    chosen_xy = scene.points if chosen is None else as_points(chosen)
    best, owner = new_canvas(h * w, predictor.device)
    passes = 0
    for chunk in decode_prompts(predictor, scene, chosen_xy, np.arange(n), cfg, clock, keep_embeddings):
        priority = chunk.logits if cfg.overlap == "logit" else -chunk.dist2
        ids = (chunk.prompts + 1)[:, None, None].expand_as(chunk.mask)
        claim_pixels(best, owner, chunk.flat[chunk.mask], priority[chunk.mask], ids[chunk.mask])
        passes += chunk.decoder_passes
        if on_progress is not None:
            on_progress(len(chunk.prompts))
    clock("post_s")
    id_map, counts = finalize_instances(owner.view(h, w).cpu().numpy(), chosen_xy, scene.radii,
                                        cfg.fallback_radius_factor)
    return id_map, {**counts, "decoder_passes": passes}
