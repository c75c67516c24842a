"""P2PNet-style point predictor (METHODS.md C1): backbone -> 2-level FPN (stride 8) -> anchor heads.

Every stride-8 cell holds `anchor_rows x anchor_cols` anchor points; the regression head moves each
anchor by `regression_scale * offset` and the classification head scores it person vs. background.
The module is reused by RPS as its point proposer, so it also returns the stride-8 feature map.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from crowdseg.models.backbone import Normalize


def anchor_points(height: int, width: int, stride: int, rows: int, cols: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """Anchor points (h * w * rows * cols, 2) xy for a (height, width) feature map at `stride`.

    Anchors of a cell are spread evenly inside it (pixel-index coordinates: the cell covering
    pixels [s*j, s*j + s - 1] has its centre at s*j + (s - 1)/2). Order: cell row, cell column,
    anchor row, anchor column - the order the heads' outputs are flattened in.
    """
    dy = (torch.arange(rows, device=device) + 0.5) * stride / rows - 0.5
    dx = (torch.arange(cols, device=device) + 0.5) * stride / cols - 0.5
    cy = torch.arange(height, device=device) * stride
    cx = torch.arange(width, device=device) * stride
    ys = (cy[:, None, None, None] + dy[None, None, :, None]).expand(height, width, rows, cols)
    xs = (cx[None, :, None, None] + dx[None, None, None, :]).expand(height, width, rows, cols)
    return torch.stack([xs, ys], -1).reshape(-1, 2).float()


def _head(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 3, padding=1))


class PointPredictor(nn.Module):
    """Predict head points.

    backbone: a `create_backbone(..., reductions=(8, 16))` module returning [C8, C16].
    cls_prior: None keeps PyTorch's default initialisation of the classification output (P2PNet);
      a probability p in (0, 1) initialises it so that every anchor starts with person probability
      p (RetinaNet's prior initialisation: weights N(0, 0.01^2), bias (0, log(p / (1 - p)))). On
      real crowds about 0.3 % of the anchors are matched to a head; starting there spares the first
      hundreds of steps, whose background gradient otherwise drives the from-scratch features.
    forward(images (B, 3, H, W) RGB in [0, 1]) returns a dict:
      - ``points``: (B, M, 2) predicted xy in pixels, M = (H/8) * (W/8) * rows * cols;
      - ``logits``: (B, M, 2) background / person logits;
      - ``features``: (B, fpn_channels, H/8, W/8) the fused stride-8 map;
      - ``anchors``: (M, 2).
    """

    stride = 8

    def __init__(self, backbone: nn.Module, fpn_channels: int = 256, head_channels: int = 256,
                 anchor_rows: int = 2, anchor_cols: int = 2, regression_scale: float = 100.0,
                 cls_prior: Optional[float] = None):
        super().__init__()
        c8, c16 = backbone.channels
        self.normalize = Normalize()
        self.backbone = backbone
        self.lateral8 = nn.Conv2d(c8, fpn_channels, 1)
        self.lateral16 = nn.Conv2d(c16, fpn_channels, 1)
        self.smooth8 = nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1)
        self.rows, self.cols, self.regression_scale = anchor_rows, anchor_cols, regression_scale
        anchors = anchor_rows * anchor_cols
        self.regression = _head(fpn_channels, head_channels, anchors * 2)
        self.classification = _head(fpn_channels, head_channels, anchors * 2)
        # Start with anchors where they are: a large random offset (x regression_scale) would
        # scatter the initial points across the image.
        nn.init.normal_(self.regression[-1].weight, std=1e-3)
        nn.init.zeros_(self.regression[-1].bias)
        if cls_prior is not None:
            init_class_prior(self.classification[-1], cls_prior)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        c8, c16 = self.backbone(self.normalize(images))
        top = self.lateral16(c16)
        p8 = self.smooth8(self.lateral8(c8) + F.interpolate(top, size=c8.shape[-2:], mode="nearest"))
        b, _, h, w = p8.shape
        offsets = self.regression(p8).permute(0, 2, 3, 1).reshape(b, -1, 2)
        logits = self.classification(p8).permute(0, 2, 3, 1).reshape(b, -1, 2)
        anchors = anchor_points(h, w, self.stride, self.rows, self.cols, device=images.device)
        return {"points": anchors + self.regression_scale * offsets, "logits": logits,
                "features": p8, "anchors": anchors}


def init_class_prior(layer: nn.Conv2d, prior: float, std: float = 0.01) -> None:
    """Initialise a (background, person)-interleaved logit layer so P(person) starts at `prior`.

    The layer's output channels are (anchor 0 background, anchor 0 person, anchor 1 background, ...)
    (the order `forward` reshapes them in). Softmax of (0, log(p / (1 - p))) is (1 - p, p).
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"cls_prior must be in (0, 1), got {prior}")
    nn.init.normal_(layer.weight, std=std)
    with torch.no_grad():
        bias = layer.bias.view(-1, 2)
        bias[:, 0] = 0.0
        bias[:, 1] = math.log(prior / (1.0 - prior))


def select_points(points: torch.Tensor, logits: torch.Tensor, threshold: float = 0.5, merge_radius: float = 0.0,
                  candidate_threshold: float = 0.05) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the selected points and their scores.

    points (B, M, 2), logits (B, M, 2) -> [(points (N_b, 2), scores (N_b,)) for each image].
    merge_radius 0 (P2PNet): the points whose person probability exceeds `threshold`.
    merge_radius r > 0: `merge_points` over the predictions scoring above `candidate_threshold`:
    near-duplicate predictions of one head become one point and a head whose probability is split
    over several predictions is still found (see `merge_points`).
    """
    scores = logits.softmax(-1)[..., 1]
    if merge_radius <= 0:
        keep = scores > threshold
        return [(points[b][keep[b]], scores[b][keep[b]]) for b in range(points.shape[0])]
    result = []
    for b in range(points.shape[0]):
        cand = scores[b] > candidate_threshold
        result.append(merge_points(points[b][cand], scores[b][cand], merge_radius, threshold))
    return result


def merge_points(points: torch.Tensor, scores: torch.Tensor, radius: float, threshold: float = 0.5,
                 chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy score-merging of point predictions: a point NMS that adds up what it suppresses.

    points (K, 2), scores (K,) -> (points (N, 2), merged scores (N,)). "Near" means closer than
    `radius` pixels along both x and y (a square window). Visiting the predictions by decreasing
    score, each one that no earlier centre is near becomes a centre (torchvision's NMS on squares of
    side `radius`); every prediction is absorbed by the highest-scoring centre near it. A centre is
    kept, at its own position, when the summed score of what it absorbed exceeds `threshold`
    (summed scores are clipped to 1), so near-duplicates of one head count once and a head whose
    probability is split over neighbouring predictions is still found.
    """
    from torchvision.ops import nms

    if len(points) == 0:
        return points, scores
    pts = points.float()
    half = radius / 2.0
    centres = nms(torch.cat([pts - half, pts + half], dim=1), scores.float(), 0.0)  # by decreasing score
    # Centres are never near each other, so a grid of `radius` cells holds at most one centre per
    # cell, and the centres near a prediction lie in its own or the 8 neighbouring cells.
    cell = torch.floor(pts / radius).long()
    key_of = lambda xy: (xy[:, 0] + (1 << 20)) * (1 << 21) + (xy[:, 1] + (1 << 20))  # noqa: E731
    centre_keys, by_key = key_of(cell[centres]).sort()
    rank_by_key = by_key  # position in `centres` (0 = highest score) of each sorted key
    owner = torch.full((len(pts),), len(centres), dtype=torch.long, device=pts.device)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            keys = key_of(cell + torch.tensor([dx, dy], device=pts.device))
            pos = torch.searchsorted(centre_keys, keys).clamp(max=len(centre_keys) - 1)
            rank = rank_by_key[pos]
            hit = (centre_keys[pos] == keys) & ((pts - pts[centres[rank]]).abs() < radius).all(-1)
            owner = torch.where(hit, torch.minimum(owner, rank), owner)
    merged = torch.zeros(len(centres), dtype=scores.dtype, device=scores.device).index_add_(0, owner, scores)
    merged = merged.clamp(max=1.0)
    keep = merged > threshold
    return points[centres][keep], merged[keep]
