"""Pictures: small images are enlarged for display, and the points land where they belong."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from crowdseg.dpmo.writer import overlay_picture
from crowdseg.vis import (CAPTION_HEIGHT, GT_COLOR, PRED_COLOR, draw_sample, enlarge, overlay_masks, point_overlay,
                          save_sample_grid)
from datamodules.dataset import build_dataset
from datamodules.transforms import EvalTransform


def test_enlarge_by_a_whole_factor_only_when_small():
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    big, factor = enlarge(rgb)
    assert factor == 4 and big.shape == (384, 512, 3)
    assert np.array_equal(big[::4, ::4], rgb) and np.array_equal(big[3::4, 3::4], rgb)   # crisp blocks
    wide = np.zeros((10, 600, 3), np.uint8)
    same, factor = enlarge(wide)
    assert factor == 1 and same is wide


def test_point_overlay_draws_gt_and_predictions_on_the_enlarged_image():
    image = torch.zeros(3, 64, 64)
    instance_map = torch.zeros(64, 64, dtype=torch.int64)
    instance_map[40:50, 40:50] = 1
    picture = point_overlay(image, torch.tensor([[10.5, 20.5]]), torch.tensor([[30.5, 5.5]]), instance_map)
    assert picture.shape == (512 + CAPTION_HEIGHT, 512, 3)                      # 64 px x 8
    assert tuple(picture[164, 84]) == GT_COLOR                                  # (x 10.5, y 20.5) x 8
    assert tuple(picture[44, 244]) == PRED_COLOR                                # the cross's centre
    assert picture[360, 360].any() and not picture[300, 300].any()              # the mask, coloured
    assert picture[512:].any()                                                  # the caption


def test_mask_overlay_of_a_small_image_is_enlarged():
    id_map = np.zeros((128, 128), np.uint16)
    id_map[10:20, 10:20] = 1
    picture = overlay_picture(torch.zeros(3, 128, 128), id_map, torch.tensor([[15.0, 15.0]]))
    assert picture.shape == (512, 512, 3)
    assert tuple(picture[60, 60]) == (255, 0, 0) and tuple(picture[40, 48]) == (255, 255, 255)   # point, outline


def test_show_writes_a_png_grid(tmp_path):
    ds = build_dataset("synthetic", None, "train", num_images=5, height=64, width=96, max_people=12,
                       transform=EvalTransform())
    samples = [ds[i] for i in range(5)]
    path = tmp_path / "pics" / "grid.png"
    save_sample_grid(samples, path, ncols=3, cell=100)
    image = cv2.imread(str(path))
    assert image.shape == (2 * 100 + 3 * 4, 3 * 100 + 4 * 4, 3)
    assert not list(path.parent.glob("*.tmp"))
    # the first point is drawn as a red dot (BGR red channel high, blue low)
    x, y = samples[0]["points"][0].tolist()
    s = 100 / max(samples[0]["image"].shape[-2:])
    px = image[4 + int(round((y + 0.5) * s - 0.5)), 4 + int(round((x + 0.5) * s - 0.5))]
    assert px[2] > 200 and px[0] < 80
    assert torch.is_tensor(samples[0]["instance_map"]) and np.isfinite(image).all()


def test_the_sample_grid_colours_instances_with_the_one_palette():
    ids = np.zeros((40, 40), np.int64)
    ids[10:30, 10:30] = 1
    sample = {"image": torch.zeros(3, 40, 40), "points": torch.zeros(0, 2), "instance_map": torch.as_tensor(ids)}
    expected = overlay_masks(np.zeros((40, 40, 3), np.uint8), ids, alpha=0.45)
    assert np.array_equal(draw_sample(sample, cell=40)[:20], expected[:20])   # above the caption
