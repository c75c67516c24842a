"""One factory for every backbone: timm models with `features_only`, weights from a local file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from torch import nn

from crowdseg.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_backbone(name: str, pretrained: Optional[str] = None, reductions: Sequence[int] = (8, 16)) -> nn.Module:
    """A timm feature extractor returning one map per requested stride in `reductions`.

    `pretrained` is a local weights file (timm / torchvision state dict) or None for random init;
    nothing is ever downloaded. The returned module has `.channels` and `.reductions` lists.
    """
    if name not in timm.list_models():
        raise ConfigError(f"key 'model.backbone': unknown timm model {name!r}")
    probe = timm.create_model(name, pretrained=False, features_only=True)
    available = list(probe.feature_info.reduction())
    missing = [r for r in reductions if r not in available]
    if missing:
        raise ConfigError(f"key 'model.backbone': {name} has no feature map at stride {missing} "
                          f"(it has {available})")
    # the last feature index per stride (the deepest layer at that resolution)
    indices = [max(i for i, r in enumerate(available) if r == want) for want in reductions]
    kwargs = dict(features_only=True, out_indices=indices)
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"key 'model.pretrained': backbone weights file not found: {path} "
                              f"(download {name} ImageNet weights, e.g. from timm's hub page, to a local path)")
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except Exception as err:  # a file that is not a state dict for this architecture
            raise ConfigError(f"key 'model.pretrained': {path} is not a {name} weights file ({err})") from None
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.channels = list(model.feature_info.channels())
    model.reductions = list(model.feature_info.reduction())
    return model


class Normalize(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std
