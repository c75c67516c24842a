"""BoxInst losses (METHODS.md B1-B3), OverlapLoss (A3) and FCOS targets against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from crowdseg.losses.boxinst import (box_masks, color_similarity, dice_loss, image_valid_masks, overlap_degree,
                                     overlap_loss, pairwise_log_same, pairwise_loss, projection_loss, rgb_to_lab,
                                     sample_one_per_group, unfold_wo_center, warmup_factor)
from crowdseg.losses.fcos import decode_boxes, fcos_losses, fcos_targets, level_ranges


# ------------------------------------------------------------------------------------- targets

def test_box_masks_sample_rows_and_columns_two_plus_four_k():
    # rows/cols sampled at 2, 6, 10, 14; box rows int(2.7)=2 .. int(5.9)=5 -> row 2 only;
    # columns 2 .. 9 -> 2 and 6
    masks = box_masks(torch.tensor([[2.0, 2.7, 9.5, 5.9]]), 16, 16, stride=4)
    expected = torch.zeros(1, 4, 4)
    expected[0, 0, 0:2] = 1
    assert torch.equal(masks, expected)
    # a box covering the whole image covers every sample
    assert box_masks(torch.tensor([[0.0, 0.0, 15.0, 15.0]]), 16, 16).sum() == 16
    assert box_masks(torch.zeros(0, 4), 16, 16).shape == (0, 4, 4)


def test_image_valid_masks_padding_and_bottom_rows():
    valid = image_valid_masks(torch.tensor([[10, 13]]), 16, 16, stride=4)
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, :3] = 1  # rows 2, 6 < 10; columns 2, 6, 10 < 13
    assert torch.equal(valid, expected)
    bottom = image_valid_masks(torch.tensor([[10, 13]]), 16, 16, stride=4, bottom_pixels_removed=5.0)
    assert bottom[0, :, 0].tolist() == [1, 0, 0, 0]  # only row 2 < 10 - 5


# -------------------------------------------------------------------------------------- colour

def test_rgb_to_lab_reference_colours():
    rgb = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    lab = rgb_to_lab(rgb.T.reshape(1, 3, 1, 5))[0, :, 0].T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032],
                             [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602]])
    assert torch.allclose(lab, expected, atol=0.02)


def test_unfold_wo_center_gives_the_eight_neighbours_at_dilation_two():
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    n = unfold_wo_center(x, 3, 2)
    assert n.shape == (1, 1, 8, 5, 5)
    # centre (2, 2): offsets (-2,-2) (-2,0) (-2,2) (0,-2) (0,2) (2,-2) (2,0) (2,2)
    assert n[0, 0, :, 2, 2].tolist() == [0, 2, 4, 10, 14, 20, 22, 24]
    # corner (0, 0): only (0,2) -> 2, (2,0) -> 10, (2,2) -> 12 exist; zero padding elsewhere
    assert n[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 2, 0, 10, 12]


def test_color_similarity_values_and_invalid_neighbours():
    lab = torch.zeros(1, 3, 5, 5)
    lab[0, 0, 2, 4] = 4.0  # the (0, +2) neighbour of (2, 2) differs by 4 in L
    valid = torch.ones(1, 5, 5)
    s = color_similarity(lab, valid)
    assert s.shape == (1, 8, 5, 5)
    centre = s[0, :, 2, 2]
    assert torch.allclose(centre[4], torch.tensor(math.exp(-2.0)))
    assert torch.allclose(centre[[0, 1, 2, 3, 5, 6, 7]], torch.ones(7))
    # corner: neighbours outside the image are not edges
    assert s[0, :, 0, 0].tolist() == [0, 0, 0, 0, 1, 0, 1, 1]
    # an invalid (padding) pixel has no edges and is no neighbour
    valid[0, 4, 4] = 0
    s = color_similarity(lab, valid)
    assert s[0, :, 4, 4].sum() == 0 and s[0, 7, 2, 2] == 0


# --------------------------------------------------------------------------------------- terms

def test_dice_loss_hand_values():
    x = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - 2 * 1 / (1 + 2 + 1e-5)
    assert torch.allclose(dice_loss(x, t), torch.tensor([1 - 2 / 3.00001]), atol=1e-6)


def test_projection_loss_hand_value_and_perfect_box():
    logits = torch.zeros(1, 4, 4)  # m = 0.5 everywhere
    box = torch.zeros(1, 4, 4)
    box[0, :2, :2] = 1
    # each axis: projections (0.5, 0.5, 0.5, 0.5) vs (1, 1, 0, 0): 1 - 2 / 3.00001
    assert torch.allclose(projection_loss(logits, box), torch.tensor(2 * (1 - 2 / 3.00001)), atol=1e-6)
    # a mask with the box's projections (here: a diagonal inside the box) has loss ~0
    diag = torch.full((1, 4, 4), -30.0)
    diag[0, 0, 0] = diag[0, 1, 1] = 30.0
    assert projection_loss(diag, box) < 1e-4
    assert projection_loss(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4)) == 0


def test_pairwise_hand_value_on_a_one_row_image():
    # a 1 x 3 map: pixel 0 and pixel 2 are each other's only neighbours (offsets (0, +-2))
    z = math.log(3.0)  # m = 0.75
    logits = torch.tensor([[[z, -5.0, z]]])
    log_same = pairwise_log_same(logits)
    assert torch.allclose(log_same[0, 4, 0, 0], torch.tensor(math.log(0.75 * 0.75 + 0.25 * 0.25)), atol=1e-6)
    sim = color_similarity(torch.zeros(1, 3, 1, 3), torch.ones(1, 1, 3))
    box = torch.tensor([[[1.0, 0.0, 0.0]]])  # only edges centred on pixel 0 count
    loss = pairwise_loss(logits, sim.expand(1, 8, 1, 3), box)
    assert torch.allclose(loss, torch.tensor(-math.log(0.625)), atol=1e-6)
    # below the colour threshold no edge counts: loss 0
    assert pairwise_loss(logits, sim * 0.2, box) == 0


def test_pairwise_matches_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    sim = torch.rand(2, 8, 6, 7)
    boxes = (torch.rand(2, 6, 7) > 0.3).float()
    offsets = [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)]
    num = den = 0.0
    for n in range(2):
        for i in range(6):
            for j in range(7):
                for k, (dy, dx) in enumerate(offsets):
                    if not (0 <= i + dy < 6 and 0 <= j + dx < 7):
                        # outside the map the unfold pads log-probabilities with 0: those edges need S = 0
                        sim[n, k, i, j] = 0.0
                        continue
                    w = float(sim[n, k, i, j] >= 0.3) * float(boxes[n, i, j])
                    a, b = torch.sigmoid(logits[n, i, j]), torch.sigmoid(logits[n, i + dy, j + dx])
                    num += w * -math.log(float(a * b + (1 - a) * (1 - b)))
                    den += w
    assert torch.allclose(pairwise_loss(logits, sim, boxes), torch.tensor(num / max(den, 1.0)), atol=1e-5)


def test_pairwise_favours_uniform_masks_inside_similar_colours():
    sim = torch.ones(1, 8, 6, 6)
    box = torch.ones(1, 6, 6)
    uniform = torch.full((1, 6, 6), 8.0)
    striped = uniform.clone()
    striped[0, :, 2:4] = -8.0  # a stripe: edges across it (dilation 2) join different labels
    assert pairwise_loss(uniform, sim, box) < 1e-3 < pairwise_loss(striped, sim, box)


def test_warmup_factor():
    assert warmup_factor(0, 100) == 0.0
    assert warmup_factor(50, 100) == 0.5
    assert warmup_factor(500, 100) == 1.0
    assert warmup_factor(3, 0) == 1.0


# ------------------------------------------------------------------------------------- overlap

def _square(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_overlap_degree_disjoint_identical_and_partial():
    a = _square(8, 8, 0, 4, 0, 4)
    b = _square(8, 8, 4, 8, 4, 8)
    c = _square(8, 8, 0, 4, 2, 6)  # shares 8 of 16 pixels with a
    d = overlap_degree(a[None], torch.stack([a, b, c]))
    assert torch.allclose(d, torch.tensor([[16 / 32, 0.0, 8 / 32]]), atol=1e-6)
    # soft masks stay in [0, 0.5]
    soft = torch.rand(5, 8, 8)
    assert (overlap_degree(soft, soft) <= 0.5 + 1e-6).all() and (overlap_degree(soft, soft) >= 0).all()


def test_overlap_loss_values_and_pairs():
    a = _square(8, 8, 0, 4, 0, 4)
    b = _square(8, 8, 4, 8, 4, 8)
    gt, img = torch.tensor([0, 1]), torch.tensor([0, 0])
    chosen = torch.tensor([0, 1])
    assert overlap_loss(torch.stack([a, b]), gt, img, chosen) == 0                       # disjoint
    same = overlap_loss(torch.stack([a, a]), gt, img, chosen, "instances")
    assert torch.allclose(same, torch.tensor(0.5))                                        # the maximum
    assert torch.allclose(overlap_loss(torch.stack([a, a]), gt, img, chosen, "sum"), torch.tensor(1.0))
    assert torch.allclose(overlap_loss(torch.stack([a, a]), gt, img, chosen, "pairs"), torch.tensor(0.5))
    # another proposal of the same GT is not a pair; masks of another image are not pairs
    probs = torch.stack([a, a, a])
    assert overlap_loss(probs, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 2])) == 0
    assert torch.allclose(overlap_loss(probs, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), torch.tensor([0, 2]),
                                       "sum"), torch.tensor(0.5 + 0.5 + 0.5))  # g0 vs p2; g1 vs p0, p1
    with pytest.raises(ValueError):
        overlap_loss(probs, gt, img, chosen, "mean")


def test_overlap_loss_gradient_pushes_the_shared_pixels_down():
    a = _square(8, 8, 0, 4, 0, 4)
    b = _square(8, 8, 0, 4, 2, 6)
    probs = (torch.stack([a, b]) * 0.8 + 0.1).requires_grad_(True)
    overlap_loss(probs, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 1])).backward()
    grad = probs.grad[0]
    # where the other mask is on, raising a raises the overlap: positive gradient (descent lowers it)
    assert (grad[0:4, 2:4] > 0).all()
    # where the other mask is off, raising a only grows the denominator: negative gradient
    assert (grad[4:, :] < 0).all()


def test_sample_one_per_group_one_member_each_and_uniform():
    groups = torch.tensor([3, 3, 3, 7, 9, 9])
    counts = torch.zeros(6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        chosen = sample_one_per_group(groups, gen)
        assert groups[chosen].tolist() == [3, 7, 9]
        counts[chosen] += 1
    assert counts[3] == 600
    assert (counts[:3] > 150).all() and (counts[4:] > 240).all()
    assert sample_one_per_group(torch.zeros(0, dtype=torch.long)).numel() == 0


# ---------------------------------------------------------------------------------------- fcos

def test_level_ranges():
    r = level_ranges(5)
    assert r[0].tolist() == [0, 64] and r[4, 0] == 512 and math.isinf(r[4, 1])


def test_fcos_targets_hand_case():
    locations = torch.tensor([[20.0, 20.0], [4.0, 4.0], [36.0, 20.0], [20.0, 20.0]])
    levels = torch.tensor([0, 0, 0, 1])
    box = torch.tensor([[10.0, 8.0, 34.0, 40.0]])  # centre (22, 24), size 24 x 32
    t = fcos_targets(locations, levels, (8, 16), box, sizes_of_interest=(64,), center_radius=1.5)
    # (20, 20): inside the centre region (22 +- 12, 24 +- 12) and level 0 -> positive
    # (4, 4): outside the box; (36, 20): outside the box; level 1 location: max distance 20 < 64 -> wrong level
    assert t.labels.tolist() == [0, -1, -1, -1]
    assert t.ltrb[0].tolist() == [10.0, 12.0, 14.0, 20.0]
    assert torch.allclose(t.centerness[0], torch.tensor(math.sqrt(10 / 14 * 12 / 20)))
    assert torch.equal(decode_boxes(locations[0], t.ltrb[0]), box[0])
    # the smaller of two containing boxes wins; an ignore region ignores the negatives it covers
    two = torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 8.0, 34.0, 40.0]])
    t = fcos_targets(locations, levels, (8, 16), two, sizes_of_interest=(64,), center_radius=0,
                     ignore_boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0]]))
    assert t.gt_index[0] == 1                     # both contain (20, 20): the smaller box
    assert t.gt_index[1] == 0 and t.labels[1] == 0  # (4, 4) is a positive of the big box, not ignored
    t = fcos_targets(locations[1:2], levels[1:2], (8, 16), box, sizes_of_interest=(64,),
                     ignore_boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0]]))
    assert t.labels.tolist() == [-2]


def test_fcos_losses_perfect_prediction_and_ignored_locations():
    locations = torch.tensor([[20.0, 20.0], [4.0, 4.0]])
    box = torch.tensor([[10.0, 8.0, 34.0, 40.0]])
    t = fcos_targets(locations, torch.tensor([0, 0]), (8,), box, sizes_of_interest=(), center_radius=0)
    cls = torch.tensor([[[20.0], [-20.0]]])
    ltrb = t.ltrb[None].clone()
    ctr = torch.logit(t.centerness[None].clamp(1e-6, 1 - 1e-6))
    losses = fcos_losses(cls, ltrb, ctr, locations, [t])
    assert losses["num_pos"] == 1 and losses["cls"] < 1e-6 and losses["box"] < 1e-6
    c = t.centerness[0]
    expected_ctr = -(c * torch.log(c) + (1 - c) * torch.log(1 - c))  # BCE at its minimum
    assert torch.allclose(losses["ctrness"], expected_ctr, atol=1e-5)
    t.labels[1] = -2  # an ignored negative predicted as person costs nothing
    bad = torch.tensor([[[20.0], [20.0]]])
    assert fcos_losses(bad, ltrb, ctr, locations, [t])["cls"] < 1e-6
