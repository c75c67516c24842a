"""The RPS policy: a small head scoring the K candidates of each point, softmax within each group.

pi_theta(k | n) = softmax_k(s_theta(f(c_nk), (c_nk - p_n) / r_n)), where f is the backbone feature
map bilinearly sampled at the candidate and the second input is the candidate's offset from the
predicted point in units of its NNEC radius (METHODS.md D2, action space (a)).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_features(features: Tensor, positions: Tensor, stride: int,
                    batch_index: Optional[Tensor] = None) -> Tensor:
    """Bilinearly sample a feature map at pixel positions.

    features: (B, C, h, w) at `stride` pixels per cell, cell j centred at pixel j*stride + (stride-1)/2;
    positions: (N, K, 2) xy in pixels; batch_index: (N,) long image of each row (None: all image 0).
    Positions outside the map take the border value. Returns (N, K, C).
    """
    b, c, h, w = features.shape
    n, k = positions.shape[:2]
    cells = (positions.to(features.dtype) - (stride - 1) / 2.0) / stride      # feature-index coords
    size = torch.tensor([w, h], dtype=features.dtype, device=features.device)
    grid = (2.0 * cells + 1.0) / size - 1.0                                   # align_corners=False
    if batch_index is None or b == 1:
        if batch_index is not None and bool((batch_index != 0).any()):
            raise ValueError("batch_index refers to images beyond a batch of one feature map")
        out = F.grid_sample(features[:1], grid[None], mode="bilinear", padding_mode="border", align_corners=False)
        return out[0].permute(1, 2, 0)
    out = features.new_zeros((n, k, c))
    for image in torch.unique(batch_index).tolist():
        rows = batch_index == image
        sampled = F.grid_sample(features[image:image + 1], grid[rows][None], mode="bilinear",
                                padding_mode="border", align_corners=False)
        out[rows] = sampled[0].permute(1, 2, 0).to(out.dtype)      # grid_sample is float32 under autocast
    return out


class CandidateScorer(nn.Module):
    """features (B, C, h, w), candidates (N, K, 2), points (N, 2), radii (N,), batch_index (N,) -> logits (N, K).

    A LayerNorm on the sampled features (backbone activations can be large next to the offsets),
    then an MLP of `num_layers` hidden layers on [features, offset / radius]. The output layer starts
    at zero (`zero_init_output`), so the initial policy is uniform over each group. Nothing is
    detached here: freeze or detach the backbone features in the caller if the RL phase should
    train the scorer only.
    """

    def __init__(self, in_channels: int, stride: int, hidden_channels: int = 128, num_layers: int = 2,
                 zero_init_output: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.stride = int(stride)
        self.norm = nn.LayerNorm(in_channels)
        layers: list[nn.Module] = []
        width = in_channels + 2
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_channels), nn.ReLU(inplace=True)]
            width = hidden_channels
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(width, 1)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, features: Tensor, candidates: Tensor, points: Tensor, radii: Tensor,
                batch_index: Optional[Tensor] = None) -> Tensor:
        sampled = self.norm(sample_features(features, candidates, self.stride, batch_index))
        offsets = (candidates - points[:, None, :]) / radii.clamp_min(1e-6)[:, None, None]
        x = torch.cat([sampled, offsets.to(sampled.dtype)], dim=-1)
        return self.output(self.mlp(x)).squeeze(-1)


def group_log_probs(logits: Tensor) -> Tensor:
    """(N, K) logits -> (N, K) log-probabilities normalised within each group (row)."""
    return torch.log_softmax(logits, dim=-1)


def log_prob(logits: Tensor, actions: Tensor) -> Tensor:
    """log pi(action) for logits (N, K) and actions (N, G) long candidate indices -> (N, G)."""
    return group_log_probs(logits).gather(1, actions.to(logits.device).long())


def sample(logits: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Draw `num_samples` candidate indices per group from softmax(logits), with replacement.

    logits: (N, K). The draw runs on the generator's device (CPU when none) so seeded runs repeat
    across devices. Returns (N, num_samples) long on the logits' device.
    """
    n, k = logits.shape
    if n == 0:
        return torch.zeros((0, num_samples), dtype=torch.long, device=logits.device)
    device = generator.device if generator is not None else torch.device("cpu")
    probabilities = torch.softmax(logits.detach().float(), dim=-1).to(device)
    actions = torch.multinomial(probabilities, num_samples, replacement=True, generator=generator)
    return actions.to(logits.device)


def greedy(logits: Tensor) -> Tensor:
    """The highest-scoring candidate of each group: (N, K) -> (N,) long (ties: the lowest index)."""
    return logits.argmax(dim=-1)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen reference copy: deepcopy, every parameter requires_grad=False, eval mode.

    Lightning's `model.train()` recurses into child modules, so a reference kept as a child goes
    back to train mode each epoch; that is harmless for `CandidateScorer` (no dropout, no batch norm).
    """
    reference = copy.deepcopy(module)
    reference.requires_grad_(False)
    return reference.eval()
