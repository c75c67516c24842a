"""The XMask network (METHODS.md A2.1): a two-scale encoder, a fuse, a stride-4 point-logit decoder
and an L2-normalised embedding head (MaskHead) with CoordConv.

- encoder: any `create_backbone(name, pretrained, reductions=(8, 16))` module; with `vgg16_bn` the
  two maps are VGG16-BN's conv4_3 (stride 8) and conv5_3 (stride 16), 512 channels each, as in
  XMask (torchvision `features[0:33]` and `features[33:43]`);
- `UpSampleFuse`: a 1x1 conv on each map, bilinear upsampling to the stride-8 size, sum, 3x3 conv
  (no BN, no ReLU);
- `LogitDecoder`: two conv3x3 + ReLU blocks, a conv3x3 to 2 * 2^2 channels, PixelShuffle(2): two
  maps at stride 4; the point logit is ``ch1 - ch0``. **A cell is a predicted person where its
  logit is > 0**, so the count of an image is the number of such cells inside it;
- `MaskHead`: CoordConv (x and y grids in [-1, 1] appended), two conv3x3 + BN + ReLU, conv3x3 to
  C * 4, PixelShuffle(2), ReLU, 1x1 conv to a 16-d embedding, L2-normalised over channels (stride 4).

Pure post-processing (`logit_points`, `count_cells`) is separate so the LightningModule, the
losses and the tests share it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crowdseg.models.backbone import Normalize

STRIDE = 4
PARAMETER_GROUPS = ("encoder", "fuse", "decoder", "mask_head")


class UpSampleFuse(nn.Module):
    """features: maps (B, C_i, h_i, w_i), the first at the finest stride -> (B, out_channels, h_0, w_0)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.out_channels = out_channels

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        fused = 0
        for conv, feature in zip(self.lateral, features):
            x = conv(feature)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused = fused + x
        return self.out(fused)


class LogitDecoder(nn.Module):
    """fused (B, C, h, w) at stride 8 -> maps (B, 2, 2h, 2w) at stride 4 (XMask's SimpleDecoder)."""

    def __init__(self, in_channels: int = 256, channels: int = 256, up_scale: int = 2, out_channels: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels * up_scale ** 2, 3, padding=1),
            nn.PixelShuffle(up_scale))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.zeros_(module.bias)

    def forward(self, fused: Tensor) -> Tensor:
        return self.body(fused)


def coord_channels(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C + 2, h, w): x and y grids in [-1, 1] appended (CoordConv)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy]).unsqueeze(0).expand(b, 2, h, w)
    return torch.cat([x, grid], dim=1)


class MaskHead(nn.Module):
    """fused (B, C, h, w) at stride 8 -> embedding (B, emb_dim, 2h, 2w) at stride 4, unit L2 norm per pixel."""

    def __init__(self, in_channels: int = 256, channels: int = 256, up_scale: int = 2, emb_dim: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + 2, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels * up_scale ** 2, 3, padding=1), nn.PixelShuffle(up_scale),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, emb_dim, 1))
        self.emb_dim = emb_dim

    def forward(self, fused: Tensor) -> Tensor:
        return F.normalize(self.body(coord_channels(fused)), p=2, dim=1, eps=1e-6)


class XMaskNet(nn.Module):
    """Encoder + fuse + stride-4 logit decoder + MaskHead.

    backbone: a `create_backbone(name, pretrained, reductions=(8, 16))` module.
    forward(images (B, 3, H, W) RGB in [0, 1], H and W multiples of 16) returns
    {"logits": (B, 1, H/4, W/4) point logits (ch1 - ch0), "maps": (B, 2, H/4, W/4) the two decoder
    channels, "embedding": (B, 16, H/4, W/4) unit-norm (only with `embedding=True`)}.
    `encoder_grad=False` runs the encoder without autograd (a phase in which it is frozen).
    """

    stride = STRIDE

    def __init__(self, backbone: nn.Module, fuse_channels: int = 256, decoder_channels: int = 256,
                 mask_channels: int = 256, emb_dim: int = 16):
        super().__init__()
        if list(getattr(backbone, "reductions", [])) != [8, 16]:
            raise ValueError(f"XMaskNet needs backbone maps at strides [8, 16], got {getattr(backbone, 'reductions', None)}")
        self.normalize = Normalize()
        self.backbone = backbone
        self.fuse = UpSampleFuse(backbone.channels, fuse_channels)
        self.decoder = LogitDecoder(fuse_channels, decoder_channels)
        self.mask_head = MaskHead(fuse_channels, mask_channels, emb_dim=emb_dim)

    def groups(self) -> dict[str, nn.Module]:
        """The parameter groups a training phase switches on or off: name -> module."""
        return {"encoder": self.backbone, "fuse": self.fuse, "decoder": self.decoder, "mask_head": self.mask_head}

    def forward(self, images: Tensor, embedding: bool = True, encoder_grad: bool = True) -> dict[str, Tensor]:
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            features = self.backbone(self.normalize(images))
        fused = self.fuse(features)
        maps = self.decoder(fused)
        out = {"logits": maps[:, 1:2] - maps[:, :1], "maps": maps}
        if embedding:
            out["embedding"] = self.mask_head(fused)
        return out


# ------------------------------------------------------------------------------- post-processing
def cells_inside(shape: tuple[int, int], image_size: Tensor, stride: int = STRIDE) -> Tensor:
    """(B, h, w) bool: cells whose centre j*stride + (stride-1)/2 lies inside each unpadded image.

    shape: (h, w) of the logit map; image_size: (B, 2) long (H, W) of the unpadded images.
    """
    h, w = shape
    size = image_size.to(torch.float32)
    device = image_size.device
    cy = torch.arange(h, device=device, dtype=torch.float32) * stride + (stride - 1) / 2.0
    cx = torch.arange(w, device=device, dtype=torch.float32) * stride + (stride - 1) / 2.0
    return (cy[None, :, None] < size[:, 0, None, None]) & (cx[None, None, :] < size[:, 1, None, None])


def count_cells(logits: Tensor, image_size: Optional[Tensor] = None, threshold: float = 0.0,
                stride: int = STRIDE) -> Tensor:
    """Counts (B,) float: cells with logit > threshold (inside each image when `image_size` is given).

    logits: (B, 1, h, w) or (B, h, w); image_size: (B, 2) long (H, W).
    """
    if logits.dim() == 4:
        logits = logits[:, 0]
    positive = logits > threshold
    if image_size is not None:
        positive = positive & cells_inside(tuple(logits.shape[-2:]), image_size.to(logits.device), stride)
    return positive.flatten(1).sum(1).float()


def logit_points(logits: Tensor, threshold: float = 0.0, stride: int = STRIDE,
                 inclusive: bool = False) -> tuple[Tensor, Tensor]:
    """Cells above a logit threshold as points of one image.

    logits: (h, w) or (1, h, w). Returns (points (N, 2) float xy in pixels = cell centres
    j*stride + (stride-1)/2, values (N,) the logits there), in row-major cell order. `inclusive`
    uses >= (XMask's candidate points, logit >= logit(p_low)) instead of >.
    """
    if logits.dim() == 3:
        logits = logits[0]
    keep = logits >= threshold if inclusive else logits > threshold
    rows, cols = torch.nonzero(keep, as_tuple=True)
    offset = (stride - 1) / 2.0
    points = torch.stack([cols.float() * stride + offset, rows.float() * stride + offset], dim=1)
    return points, logits[rows, cols]
