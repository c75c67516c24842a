"""GRPO pure functions: advantages, the clipped objective, the k3 KL and the warm-start loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from crowdseg.rl.grpo import group_advantages, grpo_loss, iou_regression_loss, k3_kl


def test_group_advantages_hand_computed_and_zero_variance_dropped():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                            [0.5, 0.5, 0.5, 0.5],
                            [0.0, 0.3, 0.6, 0.3]])
    advantages, valid = group_advantages(rewards, eps=1e-4)
    assert valid.tolist() == [True, False, True]
    assert torch.allclose(advantages[0], torch.tensor([-1.0, 1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4))
    assert advantages[1].abs().sum().item() == 0.0
    std = math.sqrt((0.09 + 0.0 + 0.09 + 0.0) / 4)           # population std of [0, .3, .6, .3]
    expected = torch.tensor([-0.3, 0.0, 0.3, 0.0]) / (std + 1e-4)
    assert torch.allclose(advantages[2], expected, atol=1e-5)
    assert torch.allclose(advantages.sum(dim=1), torch.zeros(3), atol=1e-5)


def test_group_advantages_drop_groups_equal_up_to_rounding_and_single_samples():
    a = torch.tensor(0.1)
    b = torch.nextafter(a, torch.tensor(1.0))                 # the next float: std about 4e-9, not 0
    rewards = torch.stack([torch.stack([a, a, a]), torch.stack([a, a, b])])
    assert rewards[1].std(correction=0).item() > 0
    _, valid = group_advantages(rewards)
    assert valid.tolist() == [False, False]
    _, valid = group_advantages(torch.tensor([[0.7], [0.2]]))
    assert valid.tolist() == [False, False]


def _loss_and_grad(ratio: float, advantage: float, clip_eps: float = 0.2):
    logp = torch.tensor([[math.log(0.3)]], requires_grad=True)
    old_logp = logp.detach() - math.log(ratio)
    loss, diagnostics = grpo_loss(logp, old_logp, torch.tensor([[advantage]]), torch.tensor([True]),
                                  clip_eps=clip_eps, beta=0.0)
    loss.backward()
    return loss.item(), logp.grad.item(), diagnostics


@pytest.mark.parametrize("ratio, advantage, loss, grad, clipped", [
    (1.5, 1.0, -1.2, 0.0, 1.0),      # good action already made more likely: clipped, no gradient
    (1.5, -1.0, 1.5, 1.5, 0.0),      # bad action made more likely: gradient pushes its logp down
    (1.0, 1.0, -1.0, -1.0, 0.0),     # on-policy: gradient = -A * d logp
    (1.0, -2.0, 2.0, 2.0, 0.0),
    (0.5, 1.0, -0.5, -0.5, 0.0),     # good action made less likely: unclipped, pushed back up
    (0.5, -1.0, 0.8, 0.0, 1.0),      # bad action already less likely: clipped, no gradient
])
def test_clipped_objective_value_gradient_and_clip_fraction(ratio, advantage, loss, grad, clipped):
    value, gradient, diagnostics = _loss_and_grad(ratio, advantage)
    assert value == pytest.approx(loss, abs=1e-6)
    assert gradient == pytest.approx(grad, abs=1e-6)
    assert diagnostics["clip_fraction"].item() == pytest.approx(clipped)
    assert diagnostics["ratio"].item() == pytest.approx(ratio, rel=1e-6)


def test_loss_averages_over_kept_samples_and_ignores_dropped_groups():
    logp = torch.log(torch.tensor([[0.2, 0.5], [0.4, 0.1]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0], [100.0, -100.0]])
    loss, diagnostics = grpo_loss(logp, logp.detach(), advantages, torch.tensor([True, False]), beta=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)        # -(1 - 1) / 2
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 0.5], [0.0, 0.0]]))
    assert diagnostics["valid_fraction"].item() == pytest.approx(0.5)
    assert diagnostics["num_samples"].item() == 2


def test_no_kept_group_gives_zero_loss_that_still_backpropagates():
    logp = torch.zeros(3, 4, requires_grad=True)
    loss, diagnostics = grpo_loss(logp, logp.detach(), torch.ones(3, 4), torch.zeros(3, dtype=torch.bool),
                                  ref_logp=torch.zeros(3, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad.abs().sum().item() == 0.0
    assert diagnostics["num_samples"].item() == 0 and diagnostics["clip_fraction"].item() == 0.0


def test_k3_kl_non_negative_and_zero_at_equality():
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(1000, generator=generator) * 3
    ref = torch.randn(1000, generator=generator) * 3
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all()
    assert (kl > 0).all()                                     # distinct values: strictly positive
    assert k3_kl(logp, logp).abs().max().item() == 0.0
    d = 0.7
    assert k3_kl(torch.tensor(0.0), torch.tensor(d)).item() == pytest.approx(math.exp(d) - d - 1)


def test_kl_term_pulls_the_policy_towards_the_reference():
    logp = torch.tensor([[-2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    beta = 0.1
    loss, diagnostics = grpo_loss(logp, logp.detach(), torch.zeros(1, 2), torch.tensor([True]), ref_logp=ref,
                                  beta=beta)
    expected_kl = [math.exp(1.0) - 1.0 - 1, math.exp(-0.5) + 0.5 - 1]
    assert loss.item() == pytest.approx(beta * sum(expected_kl) / 2)
    assert diagnostics["kl"].item() == pytest.approx(sum(expected_kl) / 2)
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]             # raise the too-small, lower the too-large
    at_reference = ref.clone().requires_grad_(True)
    loss, diagnostics = grpo_loss(at_reference, ref, torch.zeros(1, 2), torch.tensor([True]), ref_logp=ref, beta=beta)
    loss.backward()
    assert diagnostics["kl"].item() == 0.0 and at_reference.grad.abs().sum().item() == 0.0


def test_iou_regression_loss_bce_and_mse():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    bce = iou_regression_loss(logits, target)
    assert bce.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item())
    mse = iou_regression_loss(logits, target, kind="mse")
    assert mse.item() == pytest.approx(((torch.sigmoid(logits) - target) ** 2).mean().item())
    only_first = iou_regression_loss(logits, target, valid=torch.tensor([True, False]))
    assert only_first.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits[0], target[0]).item())
    only_first.backward()
    assert logits.grad[1].abs().sum().item() == 0.0
    assert logits.grad[0, 0].item() == pytest.approx(0.0, abs=1e-7)     # sigmoid(0) = 0.5 = target
    with pytest.raises(ValueError):
        iou_regression_loss(logits, target, kind="l1")
