"""DPMO / EDP-SAM: dense point-to-mask generation with SAM and Nearest Neighbor Exclusive Circles.

See docs/dpmo.md for the algorithm and the choices made where the papers are silent.
"""
from crowdseg.choices import check_dpmo_config
from crowdseg.dpmo.generate import generate_instance_map
from crowdseg.dpmo.nnec import nearest_neighbour_distances, nearest_neighbours, nnec_radii
from crowdseg.dpmo.prompts import build_prompts, exclusion_mask_prompt
from crowdseg.dpmo.resolve import claim_pixels, finalize_instances, resolve_overlaps
from crowdseg.dpmo.scene import Scene, decode_prompts, prepare_scene, scene_instance_map
from crowdseg.dpmo.select import select_candidates
from crowdseg.dpmo.tiles import Tile, assign_points, plan_tiles, tile_scale

__all__ = ["Tile", "assign_points", "build_prompts", "check_dpmo_config", "claim_pixels", "exclusion_mask_prompt",
           "finalize_instances", "generate_instance_map", "nearest_neighbour_distances", "nearest_neighbours",
           "nnec_radii", "plan_tiles", "prepare_scene", "resolve_overlaps", "Scene", "scene_instance_map",
           "select_candidates", "tile_scale", "decode_prompts"]
