"""Density-map counting: Gaussian targets at stride 8, the squared-error loss, the counter, pictures."""
import math

import numpy as np
import pytest
import torch

from crowdseg.losses.density import (DensityLoss, density_point_logits, density_squared_error,
                                      gaussian_cell_mass, gaussian_density_target)
from crowdseg.models.backbone import create_backbone
from crowdseg.models.density import DensityCounter, density_count_in_region
from crowdseg.vis import CAPTION_HEIGHT, density_overlay, picture_slots


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_target_cell_masses_by_hand():
    # one point at the centre of cell (0, 0) of a 16 x 16 image: along each axis the cells cover
    # [-0.5, 7.5] and [7.5, 15.5]; the Gaussian (sigma 4) mass outside [-0.5, 15.5] is given back.
    target = gaussian_density_target(torch.tensor([[3.5, 3.5]]), (16, 16), (2, 2), stride=8, sigma=4.0)
    first = _phi(1.0) - _phi(-1.0)
    second = _phi(3.0) - _phi(1.0)
    a, b = first / (first + second), second / (first + second)
    expected = torch.tensor([[a * a, a * b], [b * a, b * b]], dtype=torch.float32)
    assert torch.allclose(target, expected, atol=1e-6)


@pytest.mark.parametrize("image_size, map_size", [((64, 64), (8, 8)), ((61, 45), (8, 6)), ((40, 30), (9, 9))])
def test_target_integrates_to_the_point_count(image_size, map_size):
    h, w = image_size
    g = torch.Generator().manual_seed(0)
    points = torch.rand(37, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
    points[0] = torch.tensor([0.0, 0.0])                  # corners and borders lose nothing
    points[1] = torch.tensor([w - 1.0, h - 1.0])
    target = gaussian_density_target(points, image_size, map_size, stride=8, sigma=4.0)
    assert target.shape == map_size
    assert float(target.sum()) == pytest.approx(37.0, abs=1e-4)
    assert float(target.min()) >= 0.0
    # cells that lie wholly in the padding beyond the image get nothing
    assert float(target[math.ceil(h / 8):].abs().sum()) == 0.0 and float(target[:, math.ceil(w / 8):].abs().sum()) == 0.0


def test_target_of_an_empty_image_is_zero_and_far_points_are_dropped():
    assert float(gaussian_density_target(torch.zeros(0, 2), (32, 32), (4, 4), 8, 4.0).abs().sum()) == 0.0
    mass = gaussian_cell_mass(torch.tensor([5.0, 1e4]), num_cells=4, extent=32, stride=8, sigma=4.0)
    assert mass[0].sum().item() == pytest.approx(1.0) and mass[1].abs().sum().item() == 0.0


def test_squared_error_by_hand_and_gradient_direction():
    density = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    loss = density_squared_error(density, target)
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)       # per image sums 0.25 and 1, averaged
    loss.backward()
    assert density.grad[0, 0, 0, 0] < 0 and density.grad[1, 0, 1, 1] > 0  # raise the head cell, lower the empty one


def test_density_loss_is_zero_at_the_target_and_counts_padding_as_empty():
    points = [torch.tensor([[3.0, 4.0], [20.0, 9.0]]), torch.zeros(0, 2)]
    image_size = torch.tensor([[24, 24], [16, 16]])
    target = gaussian_density_target(points[0], (24, 24), (3, 3), 8, 4.0)
    density = torch.zeros(2, 1, 3, 3)
    density[0, 0] = target
    out = DensityLoss(stride=8, sigma=4.0)(density, points, image_size)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-10)
    assert out["count_error"].item() == pytest.approx(0.0, abs=1e-5)
    density[1, 0, 2, 2] = 1.0                                   # mass in the padding of the 16 x 16 image
    assert DensityLoss(8, 4.0)(density, points, image_size)["loss"].item() == pytest.approx(0.5)


def test_point_logits_put_half_a_point_at_the_threshold():
    density = torch.tensor([0.0, 0.25, 1.0])
    soft = torch.sigmoid(density_point_logits(density, 0.25) / 0.25)
    assert soft[0].item() == pytest.approx(0.0, abs=1e-12)
    assert soft[1].item() == pytest.approx(0.5)
    assert soft[2].item() == pytest.approx(4 ** 4 / (4 ** 4 + 1))   # (d / tau)^(1/T) / (1 + ...)


def test_density_counter_shapes_and_count():
    model = DensityCounter(create_backbone("resnet10t", reductions=(8,)), channels=(16, 8))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 48))
    assert out["density"].shape == (2, 1, 8, 6) and float(out["density"].min()) >= 0
    counts = density_count_in_region(out["density"], torch.tensor([[64, 48], [32, 48]]), model.stride)
    assert counts[0].item() == pytest.approx(float(out["density"][0].sum()), rel=1e-5)
    assert counts[1].item() == pytest.approx(float(out["density"][1, 0, :4].sum()), rel=1e-5)
    with pytest.raises(ValueError, match="stride 8"):
        DensityCounter(create_backbone("resnet10t", reductions=(8, 16)))


def test_picture_helpers():
    # batches of 3, 4 pictures wanted: the whole first batch, one image of the second, none after
    assert picture_slots(0, 3, 4) == [(0, 0), (1, 1), (2, 2)]
    assert picture_slots(1, 3, 4) == [(0, 3)]
    assert picture_slots(2, 3, 4) == []
    density = torch.zeros(4, 5)
    density[1, 2] = 2.0
    picture = density_overlay(torch.zeros(3, 32, 40), density, torch.tensor([[4.0, 28.0]]))
    f = 13                                      # enlarged for display: 40 px x 13 = 520 >= 512
    assert picture.shape == (32 * f + CAPTION_HEIGHT, 40 * f, 3) and picture.dtype == np.uint8
    # the hot cell (row 1, col 2: pixels y 8-15, x 16-23) is red in the jet map, the empty cell
    # (0, 0) blue; the GT dot green
    assert picture[4 * f, 4 * f, 2] > picture[4 * f, 4 * f, 0]
    assert picture[12 * f, 20 * f, 0] > picture[12 * f, 20 * f, 2]
    assert tuple(picture[28 * f, 4 * f]) == (0, 255, 0)
