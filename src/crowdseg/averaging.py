"""An exponential moving average of the weights with a warm-up, as a Lightning callback.

Lightning's `EMAWeightAveraging` averages with a fixed decay from the first step, so an average with
decay 0.99 still holds 0.99^t of the random initial weights after t steps (13 % at step 200): on a
short from-scratch run its first validations score an untrained model (the point predictor on
ShanghaiTech B was still silent at step 200 while its live weights found 73 % of the heads,
docs/p2p_real_data.md). The warm-up of timm's ModelEma / YOLO's EMA fixes that: the decay at the
n-th update is min(decay, (1 + n) / (10 + n)), so the average starts short and lengthens to `decay`.
Everything else (validation and checkpoints on the average, the live weights kept for resuming) is
Lightning's `WeightAveraging`.
"""
from __future__ import annotations


import torch
from lightning.pytorch.callbacks import WeightAveraging


def warmup_decay(decay: float, num_averaged: torch.Tensor) -> torch.Tensor:
    """min(decay, (1 + n) / (10 + n)) for the n-th update (n = updates already averaged in)."""
    n = num_averaged.to(torch.float64)
    return torch.clamp((1.0 + n) / (10.0 + n), max=decay)


def warmup_ema_avg_fn(decay: float) -> "WarmupEmaAverage":
    """`AveragedModel`'s avg_fn: average + (1 - d) * (current - average), d = `warmup_decay`; integer
    buffers (BatchNorm's batch counter) take the current value. No host sync (d stays a tensor)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    return WarmupEmaAverage(decay)


class WarmupEmaAverage:
    """The avg_fn of `warmup_ema_avg_fn` as a picklable object (ddp_spawn pickles the callbacks)."""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        d = warmup_decay(self.decay, num_averaged.to(averaged.device)).to(averaged.dtype)
        return torch.lerp(averaged, current, 1.0 - d)


class WarmupEMA(WeightAveraging):
    """EMA of the weights (and buffers) updated after every optimizer step, with `warmup_decay`."""

    def __init__(self, decay: float = 0.99):
        super().__init__(use_buffers=True, avg_fn=warmup_ema_avg_fn(decay))
        self.decay = decay
