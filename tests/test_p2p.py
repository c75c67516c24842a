import math

import pytest
import torch

from crowdseg.losses.p2p import P2PLoss, hungarian_match, p2p_loss, unweighted_threshold
from crowdseg.models.backbone import create_backbone
from crowdseg.models.p2p import PointPredictor, anchor_points, select_points


def test_anchor_points_are_spread_inside_their_cell():
    a = anchor_points(1, 2, stride=8, rows=2, cols=2)
    # cell (0, 0) covers pixels 0..7, centre 3.5; anchors at 3.5 -/+ 2
    assert a[:4].tolist() == [[1.5, 1.5], [5.5, 1.5], [1.5, 5.5], [5.5, 5.5]]
    assert a[4:].tolist() == [[9.5, 1.5], [13.5, 1.5], [9.5, 5.5], [13.5, 5.5]]


def test_hungarian_prefers_close_and_confident_predictions():
    pred = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.5, 0.0], [50.0, 50.0]])
    prob = torch.tensor([0.9, 0.1, 0.9, 0.9])
    gt = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    p, g = hungarian_match(pred, prob, gt, cost_point=0.05, cost_class=1.0)
    # gt 0 at (10,0): pred 1 costs 0 - 0.1 = -0.1, pred 2 costs 0.025 - 0.9 = -0.875 -> pred 2
    # gt 1 at (0,1): pred 0 costs 0.05 - 0.9 = -0.85
    assert g.tolist() == [0, 1] and p.tolist() == [2, 0]


def test_hungarian_empty_cases():
    p, g = hungarian_match(torch.zeros(5, 2), torch.ones(5), torch.zeros(0, 2))
    assert p.numel() == 0 and g.numel() == 0


def test_p2p_loss_by_hand():
    logits = torch.zeros(1, 3, 2)           # p = 0.5 everywhere -> CE = log 2 per proposal
    points = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]], requires_grad=True)
    gt = [torch.tensor([[0.0, 0.0], [0.0, 0.0]])]
    matches = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    out = p2p_loss(logits, points, gt, matches, eos_coef=0.5, point_loss_coef=0.1)
    # weighted mean CE: all terms log 2 -> log 2
    assert out["cls"].item() == pytest.approx(math.log(2))
    # squared distances 0 and 25, over 2 GT points
    assert out["point"].item() == pytest.approx(12.5)
    assert out["loss"].item() == pytest.approx(math.log(2) + 1.25)
    out["loss"].backward()
    # the regression term is applied: matched point 1 is pulled towards the GT, unmatched point 2 is not
    assert points.grad[0, 1].tolist() == pytest.approx([0.1 * 2 * 3 / 2, 0.1 * 2 * 4 / 2])
    assert points.grad[0, 2].abs().sum() == 0


def test_class_weights_follow_eos_coef():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    points = torch.zeros(1, 2, 2)
    gt = [torch.zeros(1, 2)]
    matches = [(torch.tensor([1]), torch.tensor([0]))]
    out = p2p_loss(logits, points, gt, matches, eos_coef=0.25, point_loss_coef=0.0)
    ce = math.log(1 + math.exp(-2))  # both proposals correctly classified with margin 2
    assert out["cls"].item() == pytest.approx((0.25 * ce + 1.0 * ce) / 1.25)


@pytest.mark.parametrize("eos_coef", [0.5, 0.25])
@pytest.mark.parametrize("positives", [3, 5, 7])
def test_unweighted_threshold_splits_at_person_probability_one_half(eos_coef, positives):
    """Fit one logit pair to 10 identical proposals of which `positives` are people (p = positives / 10) with
    the loss itself: its score q is p / (p + w (1 - p)), at the threshold 1 / (1 + w) when p = 1/2, and above
    it exactly when p > 1/2 (P2PNet's 0.5 is passed from p = w / (1 + w) on: 1/3 with w = 0.5)."""
    n = 10
    logit = torch.zeros(2, requires_grad=True)
    gt = [torch.zeros(positives, 2)]
    matches = [(torch.arange(positives), torch.arange(positives))]
    optimizer = torch.optim.LBFGS([logit], lr=1, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = p2p_loss(logit.expand(1, n, 2), torch.zeros(1, n, 2), gt, matches, eos_coef, 0.0)["loss"]
        loss.backward()
        return loss

    optimizer.step(closure)
    q = logit.softmax(0)[1].item()
    p = positives / n
    assert q == pytest.approx(p / (p + eos_coef * (1 - p)), abs=1e-4)
    threshold = unweighted_threshold(eos_coef)
    assert (q > threshold + 1e-4) == (p > 0.5) and (abs(q - threshold) < 1e-4) == (p == 0.5)
    assert (q > 0.5) == (p > eos_coef / (1 + eos_coef))  # 0.5 keeps p > 1/3 at w = 0.5, p > 1/5 at w = 0.25
    with pytest.raises(ValueError, match="eos_coef"):
        unweighted_threshold(0.0)


def test_point_predictor_shapes_and_select():
    model = PointPredictor(create_backbone("resnet10t", reductions=(8, 16)), fpn_channels=16, head_channels=16)
    out = model(torch.rand(2, 3, 64, 96))
    m = (64 // 8) * (96 // 8) * 4
    assert out["points"].shape == (2, m, 2) and out["logits"].shape == (2, m, 2)
    assert out["features"].shape == (2, 16, 8, 12)
    # the initial regression is small: points start near their anchors
    assert (out["points"] - out["anchors"]).abs().max() < 5
    loss = P2PLoss()(out, [torch.rand(5, 2) * 60, torch.zeros(0, 2)])
    loss["loss"].backward()
    assert torch.isfinite(loss["loss"])
    logits = torch.tensor([[[0.0, 5.0], [5.0, 0.0]]])
    sel = select_points(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), logits, 0.5)
    assert sel[0][0].tolist() == [[1.0, 2.0]]
