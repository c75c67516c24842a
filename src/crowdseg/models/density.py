"""CSRNet-style density head (Li et al., CVPR 2018, the "back-end"): a counting head on a backbone.

Dilated 3x3 convolutions (in -> 512 -> 512 -> 512 -> 256 -> 128 -> 64, dilation 2, ReLU) and a
1x1 convolution to one channel, on a feature map at stride 8; the output keeps the input's
resolution. The density is made non-negative by ReLU (CSRNet) or softplus (never dead; the
default). The count of an image is the sum of its density map (`density_count`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from crowdseg.models.backbone import Normalize

CSRNET_CHANNELS: tuple[int, ...] = (512, 512, 512, 256, 128, 64)


class DensityHead(nn.Module):
    """features (B, in_channels, h, w) at `stride` -> density (B, 1, h, w) >= 0.

    Arguments: in_channels of the backbone feature map; channels of the dilated convolutions;
    dilation; activation "softplus" or "relu"; stride (pixels per output cell, kept for callers
    that map the density back to image pixels). Weights are N(0, 0.01) with zero biases as in
    CSRNet; with softplus the output bias starts at `initial_bias` so that an untrained head
    predicts a small density (softplus(-4) = 0.018 per cell) instead of 0.69 per cell.
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = CSRNET_CHANNELS, dilation: int = 2,
                 activation: str = "softplus", stride: int = 8, initial_bias: float = -4.0) -> None:
        super().__init__()
        if activation not in ("softplus", "relu"):
            raise ValueError(f"activation must be 'softplus' or 'relu', got {activation!r}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            previous = width
        self.body = nn.Sequential(*layers)
        self.output = nn.Conv2d(previous, 1, 1)
        self.activation = activation
        self.stride = int(stride)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        if activation == "softplus":
            nn.init.constant_(self.output.bias, initial_bias)

    def forward(self, features: Tensor) -> Tensor:
        raw = self.output(self.body(features))
        return F.softplus(raw) if self.activation == "softplus" else F.relu(raw)


def density_count(density: Tensor) -> Tensor:
    """Counts (B,) of density maps (B, 1, h, w) or (B, h, w): the sum over the spatial dims."""
    return density.flatten(start_dim=1).sum(dim=1)


def density_count_in_region(density: Tensor, image_size: Tensor, stride: int) -> Tensor:
    """Counts (B,) of a padded batch: only cells whose centre lies inside each image's (H, W).

    density: (B, 1, h, w) or (B, h, w); image_size: (B, 2) long (H, W) of the unpadded images.
    """
    if density.dim() == 4:
        density = density[:, 0]
    h, w = density.shape[-2:]
    centre_y = torch.arange(h, device=density.device) * stride + (stride - 1) / 2.0
    centre_x = torch.arange(w, device=density.device) * stride + (stride - 1) / 2.0
    size = image_size.to(density.device)
    inside = (centre_y[None, :, None] < size[:, 0, None, None]) & (centre_x[None, None, :] < size[:, 1, None, None])
    return (density * inside).flatten(start_dim=1).sum(dim=1)


class DensityCounter(nn.Module):
    """A CSRNet-style counter: backbone feature map at stride 8 -> `DensityHead` -> density.

    backbone: a `create_backbone(name, pretrained, reductions=(8,))` module (one map, stride 8).
    forward(images (B, 3, H, W) RGB in [0, 1]) returns {"density": (B, 1, h, w) >= 0, its sum the
    count, h and w about H/8 and W/8 (the backbone's rounding); "features": (B, C8, h, w)}.
    """

    stride = 8

    def __init__(self, backbone: nn.Module, channels: Sequence[int] = CSRNET_CHANNELS,
                 activation: str = "softplus") -> None:
        super().__init__()
        if list(getattr(backbone, "reductions", [self.stride])) != [self.stride]:
            raise ValueError(f"DensityCounter needs one backbone map at stride 8, got {backbone.reductions}")
        self.normalize = Normalize()
        self.backbone = backbone
        self.head = DensityHead(backbone.channels[0], channels, activation=activation, stride=self.stride)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        (features,) = self.backbone(self.normalize(images))
        return {"density": self.head(features), "features": features}
