"""Mask-supervised counting losses and the CSRNet-style density head, on hand-built masks."""
import math

import pytest
import torch

from crowdseg.losses.mask_counting import (
    DensityMaskLoss, PointMaskLoss, SoftOnePointLoss, background_suppression_loss, cell_centers,
    density_at_mask_resolution, hard_one_point_error, mass_preserving_upsample, point_background_loss,
    point_instance_ids, point_unit_mass_loss, soft_one_point_loss, unit_mass_loss)
from crowdseg.models.density import DensityHead, density_count, density_count_in_region


def two_squares() -> torch.Tensor:
    """4x4 id map: instance 1 = rows 0-1 x cols 0-1, instance 2 = rows 2-3 x cols 2-3, 8 background px."""
    m = torch.zeros(4, 4, dtype=torch.long)
    m[:2, :2] = 1
    m[2:, 2:] = 2
    return m


# ------------------------------------------------------------------------------ density maps
def test_mass_preserving_upsample_keeps_total_mass_per_image():
    density = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]], [[[0.5, 0.5], [0.0, 0.0]]]])   # (2, 1, 2, 2)
    up = mass_preserving_upsample(density, (8, 8))
    assert up.shape == (2, 1, 8, 8)
    assert torch.allclose(up.sum(dim=(-2, -1)).flatten(), torch.tensor([4.0, 1.0]), atol=1e-5)


def test_mass_preserving_upsample_scale_is_detached_and_falls_back_to_area_ratio():
    density = torch.zeros(2, 2, requires_grad=True)
    up = mass_preserving_upsample(density, (4, 4))
    up.sum().backward()
    # zero map: scale = area ratio 4/16, and every low-res cell receives 4 px * 1/4 of gradient
    assert torch.allclose(density.grad, torch.ones(2, 2))


def test_density_at_mask_resolution_with_stride_crops_the_padded_upsample():
    c = 0.8
    density = torch.full((2, 2), c)
    up = density_at_mask_resolution(density, (7, 6), stride=4)
    # a uniform map upsamples to a uniform (8, 8) map holding the same mass: c / 16 per pixel
    assert up.shape == (7, 6)
    assert torch.allclose(up, torch.full((7, 6), c / 16))
    padded = density_at_mask_resolution(density, (10, 9), stride=4)
    assert padded.shape == (10, 9) and float(padded[8:].abs().sum()) == 0.0


def test_background_suppression_value_and_gradient():
    instance_map = two_squares()
    density = torch.full((4, 4), 0.5, requires_grad=True)
    loss = background_suppression_loss(density, instance_map)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    background = instance_map == 0
    # gradient 1/8 on each background pixel: descent lowers background density; none inside masks
    assert torch.allclose(density.grad[background], torch.full((8,), 1 / 8))
    assert float(density.grad[~background].abs().sum()) == 0.0


def test_background_suppression_ignores_negative_values_and_region():
    instance_map = two_squares()
    density = torch.full((4, 4), -1.0)
    assert background_suppression_loss(density, instance_map).item() == 0.0
    density = torch.zeros(4, 4)
    density[0, 3] = 2.0           # a background pixel
    region = torch.ones(4, 4, dtype=torch.bool)
    assert background_suppression_loss(density, instance_map).item() == pytest.approx(2 / 8)
    region[0, 3] = False
    assert background_suppression_loss(density, instance_map, region).item() == 0.0


def test_unit_mass_value_and_gradient_direction():
    instance_map = two_squares()
    density = torch.zeros(4, 4)
    density[:2, :2] = 0.125       # instance 1 holds 0.5
    density[2:, 2:] = 0.375       # instance 2 holds 1.5
    density.requires_grad_(True)
    loss = unit_mass_loss(density, instance_map)
    assert loss.item() == pytest.approx(0.5)   # (|0.5 - 1| + |1.5 - 1|) / 2
    loss.backward()
    assert torch.allclose(density.grad[:2, :2], torch.full((2, 2), -0.5))   # pushed up
    assert torch.allclose(density.grad[2:, 2:], torch.full((2, 2), 0.5))    # pushed down
    assert float(density.grad[instance_map == 0].abs().sum()) == 0.0


def test_unit_mass_valid_subset_and_empty_instances():
    instance_map = two_squares()
    density = torch.zeros(4, 4)
    density[:2, :2] = 0.125
    density[2:, 2:] = 0.5         # instance 2 holds 2
    assert unit_mass_loss(density, instance_map).item() == pytest.approx(0.75)
    assert unit_mass_loss(density, instance_map, valid=torch.tensor([True, False])).item() == pytest.approx(0.5)
    assert unit_mass_loss(density, instance_map, valid=torch.tensor([False, True])).item() == pytest.approx(1.0)
    # instance 3 has an empty mask: left out, not counted as mass 0
    assert unit_mass_loss(density, instance_map, num_instances=3).item() == pytest.approx(0.75)


def test_terms_on_an_image_without_instances_are_zero_and_backpropagate():
    instance_map = torch.zeros(4, 4, dtype=torch.long)
    density = torch.full((4, 4), 0.25, requires_grad=True)
    mass = unit_mass_loss(density, instance_map)
    assert mass.item() == 0.0
    mass.backward()
    assert float(density.grad.abs().sum()) == 0.0
    all_instance = torch.ones(4, 4, dtype=torch.long)
    assert background_suppression_loss(density, all_instance).item() == 0.0


def test_density_mask_loss_module_averages_over_images_where_defined():
    stride = 2
    density = torch.zeros(2, 1, 2, 2)
    density[0, 0, 0, 0] = 0.5     # image 0: instance 1 (top-left 2x2 px = cell (0, 0)) holds 0.5
    density[1, 0, 1, 1] = 0.4     # image 1: no instances, 0.4 of density on background
    density.requires_grad_(True)
    maps = [two_squares(), torch.zeros(4, 4, dtype=torch.long)]
    module = DensityMaskLoss(stride=stride, background_weight=2.0, mass_weight=3.0)
    out = module(density, maps)
    up0 = density_at_mask_resolution(density[0, 0], (4, 4), stride)
    up1 = density_at_mask_resolution(density[1, 0], (4, 4), stride)
    expected_bg = (background_suppression_loss(up0, maps[0]) + background_suppression_loss(up1, maps[1])) / 2
    expected_mass = unit_mass_loss(up0, maps[0])   # image 1 has no instance: not averaged in
    assert out["background"].item() == pytest.approx(expected_bg.item())
    assert out["unit_mass"].item() == pytest.approx(expected_mass.item())
    assert out["loss"].item() == pytest.approx(2.0 * expected_bg.item() + 3.0 * expected_mass.item())
    out["loss"].backward()
    assert density.grad[1, 0, 1, 1] > 0          # background density is pushed down


# ------------------------------------------------------------------------------ point outputs
def test_point_instance_ids_round_to_pixels_and_outside_is_background():
    points = torch.tensor([[0.4, 0.4], [2.6, 3.0], [10.0, 1.0], [-3.0, 0.0]])
    assert point_instance_ids(points, two_squares()).tolist() == [1, 2, 0, 0]


def test_point_losses_value_and_gradient():
    instance_map = torch.zeros(4, 4, dtype=torch.long)
    instance_map[:, :2] = 1
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [3.0, 0.0], [10.0, 10.0]])
    scores = torch.tensor([0.2, 0.3, 0.4, 0.8, 0.0], requires_grad=True)
    mass = point_unit_mass_loss(points, scores, instance_map)
    background = point_background_loss(points, scores, instance_map)
    assert mass.item() == pytest.approx(0.5)                  # |0.2 + 0.3 - 1|
    assert background.item() == pytest.approx(1.2 / 3)        # (0.4 + 0.8 + 0) / 3, outside = background
    (mass + background).backward()
    assert torch.allclose(scores.grad, torch.tensor([-1.0, -1.0, 1 / 3, 1 / 3, 1 / 3]))


def test_point_mass_leaves_out_instances_without_points_and_handles_no_points():
    instance_map = two_squares()
    points = torch.tensor([[0.0, 0.0]])
    scores = torch.tensor([0.9])
    # instance 2 has no point inside: no score can change it, so it is left out
    assert point_unit_mass_loss(points, scores, instance_map).item() == pytest.approx(0.1)
    none = torch.zeros((0, 2))
    assert point_unit_mass_loss(none, torch.zeros(0), instance_map).item() == 0.0
    assert point_background_loss(none, torch.zeros(0), instance_map).item() == 0.0


def test_point_mask_loss_module_matches_pure_functions():
    maps = [two_squares(), torch.zeros(4, 4, dtype=torch.long)]
    points = torch.tensor([[[0.0, 0.0], [3.0, 3.0], [3.0, 0.0]], [[1.0, 1.0], [2.0, 2.0], [0.0, 3.0]]])
    scores = torch.tensor([[0.6, 0.7, 0.1], [0.5, 0.2, 0.3]], requires_grad=True)
    out = PointMaskLoss(background_weight=1.0, mass_weight=0.5)(points, scores, maps)
    bg = (point_background_loss(points[0], scores[0], maps[0]) + point_background_loss(points[1], scores[1], maps[1])) / 2
    mass = point_unit_mass_loss(points[0], scores[0], maps[0])      # |0.6-1| and |0.7-1| -> 0.35
    assert mass.item() == pytest.approx(0.35)
    assert out["background"].item() == pytest.approx(bg.item())
    assert out["unit_mass"].item() == pytest.approx(0.35)
    assert out["loss"].item() == pytest.approx(bg.item() + 0.5 * 0.35)
    # anchors shared by every image, as P2PNet returns them: (A, 2)
    shared = PointMaskLoss()(points[0], scores, maps)
    assert shared["unit_mass"].item() == pytest.approx(0.35)     # image 1 has no instance
    assert shared["background"].item() == pytest.approx(
        ((point_background_loss(points[0], scores[0], maps[0]) + point_background_loss(points[0], scores[1], maps[1])) / 2).item())


def test_cell_centers_follow_the_stride_convention():
    centres = cell_centers(2, 3, stride=4)
    assert centres.shape == (6, 2)
    assert centres[0].tolist() == [1.5, 1.5] and centres[5].tolist() == [9.5, 5.5]


def test_soft_one_point_value_gradient_and_hard_limit():
    instance_map = torch.zeros(4, 4, dtype=torch.long)
    instance_map[:2, :] = 1       # the top row of 2x2 cells (stride 2) lies in instance 1
    logits = torch.tensor([[2.0, 2.0], [5.0, -5.0]], requires_grad=True)
    loss = soft_one_point_loss(logits, instance_map, stride=2)
    s = 1 / (1 + math.exp(-2.0))
    assert loss.item() == pytest.approx(2 * s - 1, abs=1e-6)
    loss.backward()
    # two confident cells in one instance: too many points, descent lowers both logits
    assert (logits.grad[0] > 0).all()
    assert float(logits.grad[1].abs().sum()) == 0.0     # cells on background are not this term's business
    # logits 0 in both cells: soft count 0.5 + 0.5 = 1 -> 0, while the hard count says 0 points -> 1
    zero = torch.zeros(2, 2)
    assert soft_one_point_loss(zero, instance_map, stride=2).item() == pytest.approx(0.0)
    assert hard_one_point_error(zero, instance_map, stride=2).item() == pytest.approx(1.0)
    # small temperature approaches the hard count (XMask's term, per cell)
    hard = hard_one_point_error(logits.detach(), instance_map, stride=2).item()
    assert hard == pytest.approx(1.0)
    assert soft_one_point_loss(logits.detach(), instance_map, stride=2, temperature=0.05).item() == pytest.approx(hard, abs=1e-6)


def test_soft_one_point_module_reports_soft_and_hard():
    instance_map = torch.zeros(4, 4, dtype=torch.long)
    instance_map[:2, :] = 1
    logits = torch.tensor([[[[3.0, -3.0], [0.0, 0.0]]]], requires_grad=True)
    out = SoftOnePointLoss(stride=2, weight=0.5)(logits, [instance_map])
    s3 = 1 / (1 + math.exp(-3.0))
    soft = abs(s3 + (1 - s3) - 1)             # = 0: one confident point and one confident non-point
    assert out["one_point"].item() == pytest.approx(soft, abs=1e-6)
    assert out["one_point_hard"].item() == pytest.approx(0.0)
    assert out["loss"].item() == pytest.approx(0.5 * soft, abs=1e-6)


# ------------------------------------------------------------------------------ density head
def test_density_head_shape_non_negative_and_small_at_start():
    torch.manual_seed(0)
    head = DensityHead(in_channels=16)
    features = torch.randn(2, 16, 5, 7)
    density = head(features)
    assert density.shape == (2, 1, 5, 7)
    assert (density >= 0).all()
    # softplus with output bias -4: about 0.018 per cell before training
    assert density.mean().item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=0.1)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [512, 512, 512, 256, 128, 64, 1]
    assert all(c.dilation == (2, 2) for c in convs[:-1])
    relu_head = DensityHead(in_channels=16, channels=(8, 4), activation="relu")
    assert (relu_head(features) >= 0).all()
    with pytest.raises(ValueError):
        DensityHead(in_channels=16, activation="tanh")


def test_density_counts():
    density = torch.ones(2, 1, 3, 4)
    assert density_count(density).tolist() == [12.0, 12.0]
    # stride 8: image 0 is 20x20 px (cell centres 3.5, 11.5, 19.5 all inside), image 1 is 12x12 (2x2 cells)
    sizes = torch.tensor([[20, 20], [12, 12]])
    assert density_count_in_region(density, sizes, stride=8).tolist() == [9.0, 4.0]
