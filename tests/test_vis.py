"""Pictures: small images are enlarged for display, and the points land where they belong."""
from __future__ import annotations

import numpy as np
import torch

from crowdseg.dpmo.writer import overlay_picture
from crowdseg.vis import CAPTION_HEIGHT, GT_COLOR, PRED_COLOR, enlarge, point_overlay


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
