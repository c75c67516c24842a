"""DPMO's pure functions on hand-made inputs: tiles, prompts, candidate selection, overlap resolution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from crowdseg.methods.dpmo import DpmoConfig
from crowdseg.dpmo import (Tile, assign_points, build_prompts, check_dpmo_config, exclusion_mask_prompt,
                           finalize_instances, plan_tiles, resolve_overlaps, select_candidates, tile_scale)
from crowdseg.dpmo.prompts import circle_pixels, window_cells_geometry
from crowdseg.dpmo.resolve import claim_pixels, new_canvas
from crowdseg.dpmo.tiles import auto_overlap
from crowdseg.errors import ConfigError


# ----------------------------------------------------------------------------------------- tiles
def test_tile_scale():
    # 512 x 256 image, input 1024: fitting scale 2. Median gap 4 px -> target 24 px wants 6, capped at 4.
    assert tile_scale((256, 512), 1024, 4.0, 24.0, 4.0) == 4.0
    assert tile_scale((256, 512), 1024, 16.0, 24.0, 4.0) == 2.0          # 1.5 < fit: the whole image
    assert tile_scale((256, 512), 1024, 4.0, 24.0, 4.0, tile=False) == 2.0
    assert tile_scale((256, 512), 1024, float("inf"), 24.0, 4.0) == 2.0  # lone point


def test_single_tile_when_the_image_fits():
    tiles, capped = plan_tiles((300, 400), 256, 0.5, overlap=10)
    assert len(tiles) == 1 and not capped
    assert tiles[0].core == tiles[0].context == (0, 0, 400, 300)
    assert tiles[0].resized_hw == (192, 256)
    assert tiles[0].scale_xy == (0.64, 0.64)


@pytest.mark.parametrize("hw,scale,overlap", [((300, 400), 2.0, 10), ((97, 301), 3.3, 7), ((1000, 50), 1.5, 40)])
def test_cores_partition_the_image(hw, scale, overlap):
    input_size = 256
    tiles, capped = plan_tiles(hw, input_size, scale, overlap)
    h, w = hw
    cover = np.zeros(hw, int)
    side = int(input_size // scale)
    for t in tiles:
        x0, y0, x1, y1 = t.core
        cx0, cy0, cx1, cy1 = t.context
        cover[y0:y1, x0:x1] += 1
        assert cx0 <= x0 and cy0 <= y0 and cx1 >= x1 and cy1 >= y1           # the context holds the core
        assert 0 <= cx0 and 0 <= cy0 and cx1 <= w and cy1 <= h
        assert cx1 - cx0 <= side and cy1 - cy0 <= side
        assert max(t.resized_hw) <= input_size
        sx, sy = t.scale_xy
        assert abs(sx - scale) < 0.02 * scale and abs(sy - scale) < 0.02 * scale
        ov = min(overlap, side // 4)
        if x0 > 0:
            assert x0 - cx0 == ov
    assert (cover == 1).all()
    assert capped == (overlap > side // 4)


def test_assign_points_and_auto_overlap():
    tiles, _ = plan_tiles((100, 100), 64, 1.0, overlap=8)          # context side 64, core 48: 3 x 3 tiles
    assert len(tiles) == 9
    rows = np.array([0, 99, 50, 33, 34])
    cols = np.array([0, 99, 50, 10, 10])
    owner = assign_points(tiles, rows, cols)
    for t, r, c in zip(owner, rows, cols):
        x0, y0, x1, y1 = tiles[t].core
        assert x0 <= c < x1 and y0 <= r < y1
    assert owner[0] == 0 and owner[1] == 8
    assert auto_overlap(np.array([2.0] * 19 + [100.0])) == int(np.ceil(np.percentile([2.0] * 19 + [100.0], 95))) + 1
    assert auto_overlap(np.zeros(0)) == 0


# --------------------------------------------------------------------------------------- prompts
def test_build_prompts_frames_labels_and_boxes():
    # A tile with context origin (10, 20) resized by exactly 2 (40 x 30 -> 80 x 60).
    tile = Tile(core=(10, 20, 50, 50), context=(10, 20, 50, 50), resized_hw=(60, 80))
    pts = np.array([[20.0, 30.0], [24.0, 30.0], [60.0, 30.0], [20.0, 30.2]])
    radii = np.array([4.0, 4.0, 36.0, 3.0])
    neighbours = np.array([[3, 1, 2], [0, 3, 2], [1, 0, 3], [0, 1, 2]])
    pr = build_prompts(pts, radii, neighbours, np.array([0]), tile, patch=16, embed_size=16,
                       context_factor=2.0, box_prompt=True)
    # point x = 20 -> input X = (20 - 10 + 0.5) * 2 = 21, passed as 20.5; y: (30 - 20 + 0.5) * 2 - 0.5 = 20.5
    assert pr.coords.shape == (1, 4, 2)
    torch.testing.assert_close(pr.coords[0, 0], torch.tensor([20.5, 20.5]))
    torch.testing.assert_close(pr.coords[0, 2], torch.tensor([28.5, 20.5]))   # neighbour 1 at x = 24
    # neighbour 3 is 0.2 px away (a duplicate): padding; neighbour 2 is outside the context: padding
    assert pr.labels.tolist() == [[1, -1, 0, -1]]
    torch.testing.assert_close(pr.boxes, torch.tensor([[12.5, 12.5, 28.5, 28.5]]))
    # window: centre 21 +- 2 * 4 * 2 = [5, 37] input px -> cells 0..2 (3 cells), origin (0, 0)
    assert pr.cells == 3 and pr.origins.tolist() == [[0, 0]]


def test_windows_cover_the_circles():
    tile = Tile((0, 0, 200, 100), (0, 0, 200, 100), (128, 256))               # scale 1.28
    pts = np.array([[5.0, 5.0], [150.0, 60.0], [199.0, 99.0]])
    radii = np.array([3.0, 10.0, 6.0])
    nb = np.full((3, 2), -1)
    pr = build_prompts(pts, radii, nb, np.arange(3), tile, patch=16, embed_size=16)
    p, r = torch.from_numpy(pts), torch.from_numpy(radii)
    inside, valid = window_cells_geometry(p, r, tile, pr.origins, pr.cells)
    pix = circle_pixels(p, r, tile, (100, 200), pr.origins, pr.cells)
    # every valid circle pixel samples inside its window ([-1, 1] in grid_sample coordinates)
    g = pix.grid[pix.valid]
    assert g.abs().max() <= 1.0
    # each circle holds about pi r^2 pixels (clipped at the image border for the last one)
    counts = pix.valid.sum((1, 2)).tolist()
    assert abs(counts[0] - np.pi * 9) < 6 and abs(counts[1] - np.pi * 100) < 12
    assert counts[2] < np.pi * 36 / 2                                         # a corner point: about a quarter
    assert (inside & ~valid)[:2].sum() == 0 and (inside & ~valid)[2].sum() > 0   # only the corner circle leaves
    # the low-res cells inside circle 1 cover about pi r^2 image pixels (1 cell = (4 / 1.28)^2 pixels)
    assert abs(inside[1].sum().item() * (4 / 1.28) ** 2 - np.pi * 100) < 0.25 * np.pi * 100


def test_exclusion_mask_prompt():
    inside = torch.zeros(2, 8, 8, dtype=torch.bool)
    inside[:, 2:5, 3:6] = True
    origins = torch.tensor([[0, 0], [3, 1]])                                 # embedding cells -> low-res x4
    disc = exclusion_mask_prompt(inside, origins, low_res=32, magnitude=5.0)
    assert disc.shape == (2, 1, 32, 32)
    assert disc[0, 0, 2:5, 3:6].eq(5.0).all() and disc[0].eq(5.0).sum() == 9
    assert disc[1, 0, 14:17, 7:10].eq(5.0).all() and disc[1].eq(-5.0).sum() == 32 * 32 - 9
    logits = torch.full((2, 8, 8), 20.0)
    logits[:, 3, 4] = -1.0
    refined = exclusion_mask_prompt(inside, origins, 32, 5.0, logits)
    assert refined[0, 0, 3, 4] == -1.0 and refined[0, 0, 2, 3] == 5.0        # clamped to the magnitude
    assert refined[0, 0, 0, 0] == -5.0


# ------------------------------------------------------------------------------------- selection
def test_select_prefers_candidates_inside_the_circle():
    s = 8
    inside = torch.zeros(1, s, s, dtype=torch.bool)
    inside[0, 2:6, 2:6] = True
    valid = torch.ones(1, s, s, dtype=torch.bool)
    logits = torch.full((1, 3, s, s), -1.0)
    logits[0, 0] = 1.0                       # everything: 16 / 64 inside
    logits[0, 1, 3:5, 3:5] = 1.0             # 4 cells, all inside
    logits[0, 2, 2:6, 2:6] = 1.0             # exactly the circle
    iou = torch.tensor([[0.95, 0.9, 0.5]])
    best, scores = select_candidates(logits, iou, inside, valid, "iou_inside")
    torch.testing.assert_close(scores, torch.tensor([[0.95 * 0.25, 0.9, 0.5]]))
    assert best.tolist() == [1]
    best, scores = select_candidates(logits, iou, inside, valid, "disc_iou")
    torch.testing.assert_close(scores, torch.tensor([[16 / 64, 4 / 16, 1.0]]))
    assert best.tolist() == [2]
    # cells outside the resized image do not count; an empty candidate scores 0
    valid[0, :, 6:] = False
    logits[0, 0, :, :6] = -1.0
    _, scores = select_candidates(logits, iou, inside, valid, "iou_inside")
    assert scores[0, 0] == 0.0
    with pytest.raises(ValueError):
        select_candidates(logits, iou, inside, valid, "best")


# ------------------------------------------------------------------------------------ resolution
def test_highest_priority_wins_in_any_chunking():
    flat = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    prio = torch.tensor([0.5, 0.2, 0.9, 0.1, 0.3, 0.2, -1.0])
    ids = torch.tensor([1, 1, 2, 1, 2, 3, 3])
    once = resolve_overlaps(flat, prio, ids, 5)
    assert once.tolist() == [1, 2, 2, 3, 0]
    best, owner = new_canvas(5)
    for part in ([4, 5, 6], [0, 1], [2, 3]):                  # another order, three chunks
        idx = torch.tensor(part)
        claim_pixels(best, owner, flat[idx], prio[idx], ids[idx])
    assert owner.tolist() == [1, 2, 2, 3, 0]
    torch.testing.assert_close(best[:4], torch.tensor([0.5, 0.9, 0.3, -1.0]))


def test_finalize_fallbacks_point_pixels_and_duplicates():
    h, w = 12, 12
    owner = np.zeros((h, w), np.int32)
    owner[0:6, 0:6] = 1                     # instance 1 holds the top-left block, including point 2's pixel
    points = np.array([[2.0, 2.0], [4.0, 4.0], [9.0, 9.0], [9.0, 9.0]])   # 3 and 4 are duplicates
    radii = np.array([3.0, 3.0, 4.0, 4.0])
    id_map, info = finalize_instances(owner, points, radii, fallback_radius_factor=0.5)
    assert id_map.dtype == np.uint16
    assert info["empty_fallbacks"] == 3 and info["fallback_ids"] == [2, 3, 4]
    assert id_map[4, 4] == 2                                    # a point always owns its own pixel
    assert (id_map[:6, :6] == 2).sum() == 1                     # but its fallback disc only takes background
    assert id_map[9, 9] == 3                                    # duplicates: the lower index keeps the pixel
    assert info["shared_pixel_points"] == 1
    # the two duplicate fallback discs (radius 2) split by nearest centre: ties go to one of them
    disc = {(r, c) for r in range(h) for c in range(w) if (r - 9) ** 2 + (c - 9) ** 2 <= 4}
    assert all(id_map[r, c] in (3, 4) for r, c in disc)
    assert info["missing_instances"] == int((id_map == 4).sum() == 0)
    assert set(np.unique(id_map).tolist()) <= {0, 1, 2, 3, 4}


def test_check_dpmo_config():
    check_dpmo_config(DpmoConfig())
    with pytest.raises(ConfigError, match="key 'dpmo.variant': 'sam2' is not one of dpmo, edp_sam"):
        check_dpmo_config(DpmoConfig(variant="sam2"))
    with pytest.raises(ConfigError, match="dpmo.r_max"):
        check_dpmo_config(DpmoConfig(r_min=5.0, r_max=2.0))
    with pytest.raises(ConfigError, match="dpmo.radius_factor"):
        check_dpmo_config(DpmoConfig(radius_factor=0.0))
