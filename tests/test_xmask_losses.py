"""XMask losses (crowdseg/losses/xmask.py) against hand-computed values, with gradient directions."""
import math

import pytest
import torch

from crowdseg.losses.xmask import (DiscriminativeLoss, MaskConstraintLoss, P2RLoss, discriminative_loss,
                                   mask_constraint_terms, p2r_loss, p2r_targets, point_mask_term,
                                   published_one_point_error)
from crowdseg.xmask.discs import disc_pixel_pairs, disc_union, gaussian_smooth, sample_centres

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------- P2R
def test_p2r_target_is_nearest_cell_and_value():
    logits = torch.zeros(2, 2, requires_grad=True)
    points = torch.tensor([[5.0, 1.0]])  # nearest cell centre (5.5, 1.5): row 0, col 1
    target = p2r_targets(logits, points, stride=4)
    assert target.tolist() == [[0.0, 1.0], [0.0, 0.0]]
    loss = p2r_loss(logits, points, stride=4)
    # BCE(0, t) = ln 2 for every cell; weights T + 1 = [1, 2, 1, 1]; mean over the 4 cells
    assert loss.item() == pytest.approx(5 * LN2 / 4, rel=1e-6)
    loss.backward()
    g = logits.grad
    assert g[0, 1] < 0  # the target cell is pushed up
    assert (g[0, 0] > 0) and (g[1, 0] > 0) and (g[1, 1] > 0)  # the others down


def test_p2r_target_follows_the_logits_within_the_region():
    logits = torch.zeros(2, 2)
    logits[0, 0] = 10.0  # cost 8 * 3.54 / 8 - 10 < cost 0.71 of the nearest cell
    assert p2r_targets(logits, torch.tensor([[5.0, 1.0]]), stride=4)[0, 0] == 1.0


def test_p2r_each_point_gets_one_target_and_far_points_none():
    logits = torch.zeros(8, 8)
    points = torch.tensor([[2.0, 2.0], [20.0, 20.0], [500.0, 500.0]])  # the last is > 96 px from every cell
    target = p2r_targets(logits, points, stride=4)
    assert target.sum() == 2
    assert target[0, 0] == 1 and target[5, 5] == 1  # cells centred at (1.5, 1.5) and (21.5, 21.5)


def test_p2r_without_points_and_with_weights():
    logits = torch.full((2, 2), 1.0, requires_grad=True)
    loss = p2r_loss(logits, torch.zeros(0, 2), stride=4)
    bce = -math.log(1 - torch.sigmoid(torch.tensor(1.0)).item())
    assert loss.item() == pytest.approx(0.5 * bce, rel=1e-6)
    weight = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert p2r_loss(logits, torch.zeros(0, 2), 4, weight).item() == pytest.approx(0.5 * bce / 4, rel=1e-6)
    batch = P2RLoss(stride=4)(logits.detach()[None, None].expand(2, 1, 2, 2), [torch.zeros(0, 2)] * 2)
    assert batch.item() == pytest.approx(0.5 * bce, rel=1e-6)


# ------------------------------------------------------------------------------------ disc helpers
def test_disc_pixel_pairs_match_a_dense_reference():
    torch.manual_seed(0)
    points = torch.rand(7, 2) * torch.tensor([30.0, 20.0])
    radii = torch.rand(7) * 6 + 1
    owner, pixel, sq = disc_pixel_pairs(points, radii, (20, 30))
    got = set(zip(owner.tolist(), pixel.tolist()))
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    want = set()
    for i, (p, r) in enumerate(zip(points, radii)):
        inside = ((xs - p[0]) ** 2 + (ys - p[1]) ** 2) <= r ** 2
        want |= {(i, int(k)) for k in torch.nonzero(inside.reshape(-1)).squeeze(1)}
    assert got == want


def test_disc_union_both_ways_agree():
    torch.manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    for n in (3, 400):  # pairs / KD-tree
        points = torch.rand(n, 2) * torch.tensor([30.0, 20.0])
        d2 = ((xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2).amin(0)
        assert torch.equal(disc_union(points, 3.5, (20, 30)), d2 <= 3.5 ** 2)


def test_gaussian_smooth_keeps_constants_inside_and_identity_for_k1():
    x = torch.ones(2, 15, 15)
    y = gaussian_smooth(x, 7, 1.5)
    assert torch.allclose(y[:, 7, 7], torch.ones(2), atol=1e-6)
    assert torch.equal(gaussian_smooth(x * 3, 1, 1.0), x * 3)


def test_sample_centres_is_the_pixel_vector_and_differentiable():
    emb = torch.randn(3, 6, 8, requires_grad=True)
    centres = sample_centres(emb, torch.tensor([[2.2, 4.7]]))  # pixel row 5, col 2
    assert torch.allclose(centres[0], emb[:, 5, 2], atol=1e-6)
    centres.sum().backward()
    assert emb.grad[:, 5, 2].abs().sum() > 0


# ----------------------------------------------------------------------------- discriminative loss
def _disc_case():
    """5x5 image, one point at (2, 2) (lone: radius 0.5 * 5 = 2.5, 21 disc pixels), column x = 0
    background (3 disc pixels), the rest instance 1; embeddings (1, 0) on the instance except one
    pixel (0, 1), (0.6, 0.8) on background."""
    m = torch.ones(5, 5, dtype=torch.long)
    m[:, 0] = 0
    emb = torch.zeros(2, 5, 5)
    emb[0] = 1.0
    emb[:, :, 0] = torch.tensor([0.6, 0.8])[:, None]
    emb[:, 2, 3] = torch.tensor([0.0, 1.0])
    return emb.requires_grad_(True), torch.tensor([[2.0, 2.0]]), m


def test_discriminative_loss_hand_values():
    emb, pts, m = _disc_case()
    out = discriminative_loss(emb, pts, m, kernel_size=1, point_mask_weight=0.0)
    pull = (math.sqrt(2) - 0.5) / 18
    push = 1.0 - math.sqrt(0.8)
    assert out["pull"].item() == pytest.approx(pull, rel=1e-5)
    assert out["push"].item() == pytest.approx(push, rel=1e-5)
    assert out["loss"].item() == pytest.approx(pull + push, rel=1e-5)
    out["loss"].backward()
    g = emb.grad
    away = emb.detach()[:, 2, 0] - emb.detach()[:, 2, 2]
    toward = emb.detach()[:, 2, 3] - emb.detach()[:, 2, 2]
    assert torch.dot(g[:, 2, 0], away) < 0    # descent moves the background pixel away from the centre
    assert torch.dot(g[:, 2, 3], toward) > 0  # and the odd instance pixel towards it
    assert g[:, 2, 2].abs().sum() > 0          # the centre is sampled differentiably


def test_discriminative_loss_invalid_zone_and_region_and_background_points():
    emb, pts, m = _disc_case()
    invalid = torch.zeros(5, 5, dtype=torch.bool)
    invalid[:, 0] = True
    out = discriminative_loss(emb, pts, m, invalid=invalid, kernel_size=1, point_mask_weight=0.0)
    assert out["push"].item() == 0.0
    assert out["pull"].item() == pytest.approx((math.sqrt(2) - 0.5) / 18, rel=1e-5)
    region = torch.ones(5, 5, dtype=torch.bool)
    region[2, 2] = False  # the point itself is erased: skipped
    assert discriminative_loss(emb, pts, m, region=region, kernel_size=1, point_mask_weight=0.0)["points"] == 0
    on_bg = discriminative_loss(emb, torch.tensor([[0.0, 2.0]]), m, kernel_size=1, point_mask_weight=0.0)
    assert on_bg["loss"].item() == 0.0 and on_bg["loss"].requires_grad


def test_discriminative_loss_is_finite_with_smoothing_and_many_points():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 32, 32), dim=0).requires_grad_(True)
    m = torch.randint(0, 6, (32, 32))
    pts = torch.rand(40, 2) * 31
    out = discriminative_loss(emb, pts, m)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(emb.grad).all()


def test_point_mask_term_values_and_soft_gradient():
    m = torch.zeros(5, 5, dtype=torch.long)
    m[2:, 2:] = 1
    m[0, 4] = 2
    pts = torch.tensor([[0.0, 0.0], [3.0, 3.0]])  # one on background, one on instance 1
    assert point_mask_term(pts, m).item() == pytest.approx(1 / (2 + 2))
    region = torch.zeros(5, 5, dtype=torch.bool)
    region[0, :2] = True  # only the background point's corner is seen; no foreground id inside
    assert point_mask_term(pts, m, region).item() == pytest.approx(1 / (2 + 1))
    far = torch.tensor([[4.0, 4.0]])  # no point in the valid region: + 1
    assert point_mask_term(far, m, region).item() == pytest.approx(1 / (1 + 1))
    scores = torch.tensor([0.3, 0.9], requires_grad=True)
    value = point_mask_term(pts, m, scores=scores)
    assert value.item() == pytest.approx(0.3 / 4)
    value.backward()
    assert scores.grad[0] > 0 and scores.grad[1] == 0


def test_discriminative_module_averages_over_the_batch():
    emb, pts, m = _disc_case()
    loss = DiscriminativeLoss(stride=1, kernel_size=1, point_mask_weight=0.0)
    one = discriminative_loss(emb.detach(), pts, m, kernel_size=1, point_mask_weight=0.0)["loss"]
    out = loss(torch.stack([emb.detach(), emb.detach()]), [pts, torch.zeros(0, 2)], [m, m])
    assert out["loss"].item() == pytest.approx(one.item() / 2, rel=1e-5)


# ------------------------------------------------------------------------------- mask constraint
def test_mask_constraint_hand_values_and_soft_one_point_gradient():
    logits = torch.full((2, 2), 2.0, requires_grad=True)  # stride 4: an 8 x 8 image
    m = torch.zeros(8, 8, dtype=torch.long)
    m[:4, :4] = 1  # holds cell (0, 0) only
    terms = mask_constraint_terms(logits, m, stride=4)
    assert terms["background"].item() == pytest.approx(2.0, rel=1e-6)           # relu(up) = 2 on background
    assert terms["unit_mass"].item() == pytest.approx(1.0, rel=1e-5)            # 16 px * 2 / 16 - 1
    assert terms["one_point"].item() == pytest.approx(1 - torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-5)
    assert terms["one_point_published"].item() == 15.0                          # 16 positive pixels - 1
    grad, = torch.autograd.grad(terms["one_point"], logits)
    assert grad[0, 0] < 0 and grad.abs().sum() > 0  # the soft term trains; the published one cannot
    assert not published_one_point_error(logits, m, 4).requires_grad


def test_mask_constraint_valid_instances_and_region():
    logits = torch.full((2, 2), 2.0)
    m = torch.zeros(8, 8, dtype=torch.long)
    m[:4, :4] = 1
    m[4:, 4:] = 2
    only_first = mask_constraint_terms(logits, m, 4, valid=torch.tensor([True, False]))
    none = mask_constraint_terms(logits, m, 4, valid=torch.tensor([False, False]))
    assert only_first["one_point_published"].item() == 15.0
    assert none["unit_mass"].item() == 0.0 and none["one_point"].item() == 0.0
    region = torch.zeros(8, 8, dtype=torch.bool)
    assert mask_constraint_terms(logits, m, 4, region=region)["background"].item() == 0.0
    module = MaskConstraintLoss(stride=4, background_weight=0.5, mass_weight=2.0, one_point_weight=1.0)
    out = module(logits[None, None], [m])
    t = mask_constraint_terms(logits, m, 4)
    want = 0.5 * t["background"] + 2.0 * t["unit_mass"] + t["one_point"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
