"""DPMO / EDP-SAM on real crowd images (../shared/data) with the tiny random SAM and a stand-in.

The tiny SAM is random, so its masks are not good people; what must hold regardless is the
structure: one exclusive id per pixel, id k is the instance of point k-1 and holds that point's
pixel, every instance lies inside its NNEC circle. Tiling is compared with no tiling through a
translation-equivariant stand-in predictor (SAM itself sees different context per tile, which is
the documented seam of tiling).
"""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from crowdseg.methods.dpmo import DpmoConfig
from crowdseg.dpmo import generate_instance_map, nnec_radii
from crowdseg.sam import BatchedSamPredictor, ImageEmbedding, build_sam
from datamodules.readers import READERS

CITY = "cityuhkx_bev_cclabeler_json"


def load(shared_data, dataset: str, folder: str, name: str):
    records, problems = READERS[dataset](shared_data / folder, "all")
    assert not problems
    record = next(r for r in records if r.name == name)
    rgb = cv2.cvtColor(cv2.imread(str(record.image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0, record.points.astype(np.float64)


@pytest.fixture(scope="module")
def tiny_predictor():
    return BatchedSamPredictor(build_sam("tiny"), prompt_chunk=64)


def check_instance_map(id_map, points, cfg, report):
    """The structural guarantees of `generate_instance_map` (no duplicate points in these images)."""
    h, w = id_map.shape
    n = len(points)
    assert id_map.dtype == np.uint16
    assert id_map.max() <= n
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, h - 1)
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, w - 1)
    assert (id_map[rows, cols] == np.arange(1, n + 1)).all()          # id k holds point k-1's own pixel
    assert report["num_points"] == report["num_instances"] == n and report["missing_instances"] == 0
    radii = nnec_radii(points, (h, w), cfg.radius_factor, cfg.r_min, cfg.r_max, cfg.lone_radius)
    yy, xx = np.nonzero(id_map)
    k = id_map[yy, xx].astype(int) - 1
    d2 = (xx - points[k, 0]) ** 2 + (yy - points[k, 1]) ** 2
    assert (d2 <= radii[k] ** 2 + 1e-6).all()                           # every mask inside its circle
    sizes = np.bincount(id_map.ravel(), minlength=n + 1)[1:]
    assert (sizes >= 1).all()


@pytest.mark.parametrize("name", ["scene_041_2.jpg", "scene_026_2.jpg", "scene_007_1.jpg"])
@pytest.mark.parametrize("variant,overlap,tile", [("dpmo", "logit", True), ("edp_sam", "nearest", False)])
def test_tiny_sam_on_cityuhk(shared_data, tiny_predictor, name, variant, overlap, tile):
    image, points = load(shared_data, "cclabeler", CITY, name)
    cfg = DpmoConfig(variant=variant, overlap=overlap, tile=tile)
    id_map, report = generate_instance_map(tiny_predictor, image, points, cfg)
    assert id_map.shape == (384, 512)
    check_instance_map(id_map, points, cfg, report)
    assert report["decoder_passes"] >= (2 if variant == "edp_sam" else 1) * report["tiles_encoded"]


def test_tiny_sam_on_shanghaitech_a_tiled(shared_data, tiny_predictor):
    image, points = load(shared_data, "sha", "shanghaitech_A_samples", "IMG_167.jpg")
    assert len(points) == 271
    cfg = DpmoConfig(radius_factor=0.5, box_prompt=True, target_nn_px=16.0, max_scale=2.0)
    finished = []                                                       # the per-chunk progress calls
    id_map, report = generate_instance_map(tiny_predictor, image, points, cfg, on_progress=finished.append)
    check_instance_map(id_map, points, cfg, report)
    assert report["tiles"] > 1 and report["tiles_encoded"] > 1
    assert sum(finished) == 271 and len(finished) >= report["tiles_encoded"]
    assert max(finished) <= tiny_predictor.prompt_chunk
    assert report["timings"]["total_s"] >= report["timings"]["encoder_s"] + report["timings"]["decoder_s"]


def test_edp_sam_disc_prompt_is_one_pass(shared_data, tiny_predictor):
    image, points = load(shared_data, "cclabeler", CITY, "scene_041_2.jpg")
    cfg = DpmoConfig(variant="edp_sam", edp_dense_prompt="disc", tile=False)
    id_map, report = generate_instance_map(tiny_predictor, image, points, cfg)
    check_instance_map(id_map, points, cfg, report)
    chunks = -(-len(points) // tiny_predictor.prompt_chunk)
    assert report["decoder_passes"] == chunks
    _, two_pass = generate_instance_map(tiny_predictor, image, points, replace(cfg, edp_dense_prompt="selected"))
    assert two_pass["decoder_passes"] == 2 * chunks


@pytest.mark.parametrize("variant", ["dpmo", "edp_sam"])
def test_bfloat16_autocast_keeps_the_guarantees(shared_data, tiny_predictor, variant):
    """What `trainer.precision=bf16-mixed` does to `crowdseg masks`: same structure, nearly the same map."""
    image, points = load(shared_data, "cclabeler", CITY, "scene_041_2.jpg")
    cfg = DpmoConfig(variant=variant)
    full, _ = generate_instance_map(tiny_predictor, image, points, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, report = generate_instance_map(tiny_predictor, image, points, cfg)
    check_instance_map(half, points, cfg, report)
    foreground = (full > 0) | (half > 0)
    assert (full[foreground] == half[foreground]).mean() > 0.97


class ColourPredictor:
    """A stand-in for SAM with the same interface whose logits depend only on local image content.

    Logit of a low-res cell = tau - L1 distance between the cell's mean colour and the colour of
    the positive point's cell; candidates use three taus. Unlike SAM it is translation-equivariant,
    so tiling must reproduce the untiled result up to resampling at mask borders.
    """

    def __init__(self, input_size: int, taus=(0.15, 0.3, 0.6), prompt_chunk: int = 32):
        self.input_size, self.embed_size, self.patch = input_size, input_size // 16, 16
        self.low_res_size, self.prompt_chunk = input_size // 4, prompt_chunk
        self.taus = torch.tensor(taus)
        self.device = torch.device("cpu")

    def encode(self, image):
        h, w = image.shape[-2:]
        padded = torch.nn.functional.pad(image, (0, self.input_size - w, 0, self.input_size - h))
        return ImageEmbedding(torch.nn.functional.avg_pool2d(padded[None], 4), (h, w))

    def decode(self, embedding, coords, labels, origins, cells, boxes=None, mask_input=None, multimask=True):
        colours = embedding.features[0]                                   # (3, L, L)
        b, s = len(coords), 4 * cells
        origins = origins.clamp(0, self.embed_size - cells) * 4
        cell = ((coords[:, 0] + 0.5) / 4).floor().long().clamp(0, self.low_res_size - 1)
        ref = colours[:, cell[:, 1], cell[:, 0]].T                        # (B, 3)
        rows = (origins[:, 0:1] + torch.arange(s))[:, :, None]
        cols = (origins[:, 1:2] + torch.arange(s))[:, None, :]
        window = colours[:, rows, cols].permute(1, 0, 2, 3)               # (B, 3, S, S)
        dist = (window - ref[:, :, None, None]).abs().sum(1)
        taus = self.taus if multimask else self.taus[1:2]
        logits = taus[None, :, None, None] - dist[:, None]
        return logits, torch.tensor([0.5, 0.6, 0.7])[: len(taus)].expand(b, -1)


@pytest.mark.parametrize("name", ["scene_041_2.jpg", "scene_005_2.jpg"])
def test_tiling_matches_no_tiling_up_to_resampling(shared_data, name):
    """Same scale (2 input px per image px) once in one 1024 input, once in 128 px tiles of a 256 input.

    Overlap 32 gives 64 px cores, so every tile edge is even and the tiles' low-res grids (2 image px
    per cell) line up with the whole image's; r_max 15 keeps every context disc (2 radii) inside its
    tile's context. What remains is bilinear resampling next to a context edge. Larger circles add
    the documented seams (less context for candidate selection, circles cut at the context)."""
    image, points = load(shared_data, "cclabeler", CITY, name)
    base = DpmoConfig(overlap="nearest", num_negatives=2, r_max=15.0)
    whole, rep_whole = generate_instance_map(ColourPredictor(1024), image, points, replace(base, tile=False))
    median_nn = rep_whole["median_nn_px"]
    tiled_cfg = replace(base, target_nn_px=2.0 * median_nn, max_scale=2.0, tile_overlap=32)
    tiled, rep_tiled = generate_instance_map(ColourPredictor(256), image, points, tiled_cfg)
    assert rep_whole["tiles"] == 1 and rep_whole["scale"] == 2.0
    assert rep_tiled["tiles"] > 1 and rep_tiled["scale"] == 2.0
    for id_map, rep in ((whole, rep_whole), (tiled, rep_tiled)):
        check_instance_map(id_map, points, base, rep)
    assert rep_tiled["tiles"] == 6 * 8
    fg = (whole > 0) | (tiled > 0)
    agree = ((whole == tiled) & fg).sum() / fg.sum()
    assert agree > 0.995, agree                # measured: 0.9995 and 1.0


@pytest.mark.parametrize("tile", [False, True])
def test_nearest_rule_gives_the_voronoi_split_of_the_circles(shared_data, tile):
    """With every pixel foreground, `overlap: nearest` must give each pixel of the union of circles to
    the nearest point among those whose circle holds it, across tiles too."""
    image, points = load(shared_data, "cclabeler", CITY, "scene_041_1.jpg")
    cfg = DpmoConfig(overlap="nearest", tile=tile, target_nn_px=20.0, r_max=20.0, tile_overlap=21)
    predictor = ColourPredictor(256, taus=(100.0, 100.0, 100.0))
    id_map, report = generate_instance_map(predictor, image, points, cfg)
    assert (report["tiles"] > 1) == tile and not report["tile_overlap_capped"]
    check_instance_map(id_map, points, cfg, report)
    h, w = id_map.shape
    radii = nnec_radii(points, (h, w), cfg.radius_factor, cfg.r_min, cfg.r_max, cfg.lone_radius)
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (xx[None] - points[:, 0, None, None]) ** 2 + (yy[None] - points[:, 1, None, None]) ** 2   # (N, H, W)
    inside = d2 <= radii[:, None, None] ** 2
    nearest = np.where(inside, d2, np.inf).min(0)
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, h - 1)
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, w - 1)
    free = np.ones((h, w), bool)
    free[rows, cols] = False                                             # point pixels are forced
    assert ((id_map > 0) == inside.any(0))[free].all()
    owner_d2 = np.take_along_axis(d2, (id_map.astype(int) - 1).clip(0)[None], 0)[0]
    assert np.allclose(owner_d2[free & (id_map > 0)], nearest[free & (id_map > 0)])


def test_no_points_and_duplicate_points(tiny_predictor):
    empty, report = generate_instance_map(tiny_predictor, torch.rand(3, 50, 70), np.zeros((0, 2)), DpmoConfig())
    assert empty.shape == (50, 70) and empty.max() == 0 and report["tiles_encoded"] == 0
    points = torch.tensor([[-0.4, 49.3], [69.4, 0.0], [69.4, 0.0]])        # on the border; 2 and 3 coincide
    id_map, report = generate_instance_map(tiny_predictor, torch.rand(3, 50, 70), points, DpmoConfig())
    assert id_map[49, 0] == 1 and id_map[0, 69] == 2                     # the lower index keeps a shared pixel
    assert report["shared_pixel_points"] == 1
    assert report["missing_instances"] == int((id_map == 3).sum() == 0)
