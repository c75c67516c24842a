"""GRPO objective for Reinforced Point Selection (METHODS.md D1, D2).

One RPS "query" is a predicted point n; its group is G actions (candidate indices) sampled from the
old policy, with rewards R (N, G). Episodes are single-step, so there is no token averaging:

    A = (R - mean_G R) / (std_G R + eps)                       groups with std 0 are dropped
    rho = exp(logp - logp_old)
    loss = mean over kept samples of [ -min(rho A, clip(rho, 1-eps_clip, 1+eps_clip) A) + beta KL ]
    KL = exp(ref - logp) - (ref - logp) - 1                    (k3 estimator of KL(pi || pi_ref))

The std is the population std (divide by G): a group of G identical rewards gives std 0 for any G,
including G = 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def group_advantages(rewards: Tensor, eps: float = 1e-4, zero_std_tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Group-normalised advantages.

    rewards: (N, G) float, one row per group. Returns advantages (N, G) and valid (N,) bool, False
    for groups whose reward std is <= `zero_std_tol` (all rewards equal up to rounding): they carry
    no learning signal and are dropped from the loss; their advantages are 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N, G), got {tuple(rewards.shape)}")
    rewards = rewards.detach().float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, correction=0, keepdim=True) if rewards.shape[1] > 0 else torch.zeros_like(mean)
    valid = std[:, 0] > zero_std_tol
    advantages = (rewards - mean) / (std + eps)
    return advantages * valid[:, None], valid


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-sample k3 estimator of KL(pi || pi_ref) at samples from pi: exp(d) - d - 1, d = ref - logp.

    Non-negative (exp(d) >= 1 + d) and 0 exactly where logp == ref_logp; differentiable w.r.t. both.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, valid: Tensor,
              ref_logp: Optional[Tensor] = None, clip_eps: float = 0.2,
              beta: float = 0.04) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss and diagnostics.

    logp: (N, G) log pi_theta of the sampled actions (with grad); old_logp: (N, G) log pi_old at
    sampling time (detached here; pass ``logp.detach()`` for a single update per exploration step,
    where rho = 1 but the gradient still flows); advantages: (N, G) from `group_advantages`;
    valid: (N,) bool groups (or (N, G) bool samples) to keep; ref_logp: (N, G) log pi_ref or None
    (then no KL term). The loss averages the per-sample loss over the kept samples; it is 0 (still
    attached to the graph) when none is kept.

    Diagnostics (detached scalars, over the kept samples): ``clip_fraction`` (share of samples whose
    clipped branch is active, i.e. with zero policy gradient: rho > 1+eps with A > 0 or rho < 1-eps
    with A < 0), ``kl`` (mean k3), ``ratio`` (mean rho), ``valid_fraction`` (share of kept groups
    or samples) and ``num_samples``.
    """
    if logp.shape != old_logp.shape or logp.shape != advantages.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have the same (N, G) shape")
    advantages = advantages.detach()
    ratio = torch.exp(logp - old_logp.detach())
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach())
        per_sample = -surrogate + beta * kl
    else:
        kl = torch.zeros_like(logp)
        per_sample = -surrogate
    keep = valid.to(device=logp.device, dtype=torch.bool)
    keep = (keep[:, None] if keep.dim() == 1 else keep).expand_as(logp)
    weight = keep.to(per_sample.dtype)
    n = weight.sum()
    loss = (per_sample * weight).sum() / n.clamp_min(1.0)

    with torch.no_grad():
        clipped = ((ratio > 1.0 + clip_eps) & (advantages > 0)) | ((ratio < 1.0 - clip_eps) & (advantages < 0))
        denominator = n.clamp_min(1.0)
        diagnostics = {
            "clip_fraction": (clipped.to(weight.dtype) * weight).sum() / denominator,
            "kl": (kl.detach() * weight).sum() / denominator,
            "ratio": (ratio.detach() * weight).sum() / denominator,
            "valid_fraction": (valid.float().mean() if valid.numel() else weight.new_zeros(())),
            "num_samples": n.detach(),
        }
    return loss, diagnostics


def iou_regression_loss(logits: Tensor, target_iou: Tensor, kind: str = "bce",
                        valid: Optional[Tensor] = None) -> Tensor:
    """Warm-start loss: the scorer regresses each candidate's reward (its mask IoU) before GRPO.

    logits: (N, K) scorer outputs; target_iou: (N, K) in [0, 1]; kind "bce" (BCE-with-logits to the
    IoU, so sigmoid(logit) estimates the IoU and softmax within a group ranks candidates by it) or
    "mse" (MSE between sigmoid(logit) and the IoU); valid: optional (N,) bool groups to keep.
    Returns the mean over kept candidates (0, attached, when none).
    """
    if logits.shape != target_iou.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target_iou {tuple(target_iou.shape)} differ")
    target = target_iou.detach().to(logits.dtype).clamp(0.0, 1.0)
    if kind == "bce":
        per_candidate = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    elif kind == "mse":
        per_candidate = (torch.sigmoid(logits) - target) ** 2
    else:
        raise ValueError(f"kind must be 'bce' or 'mse', got {kind!r}")
    if valid is None:
        return per_candidate.mean() if per_candidate.numel() else logits.sum() * 0.0
    weight = valid.to(device=logits.device, dtype=logits.dtype)[:, None].expand_as(per_candidate)
    return (per_candidate * weight).sum() / weight.sum().clamp_min(1.0)
