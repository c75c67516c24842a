"""CondInst / BoxInst detector (METHODS.md B4) composed from torchvision parts, with our own forward.

- Backbone: a torchvision ResNet (`BackboneWithFPN`, layers 2-4, `LastLevelP6P7`: P3-P7, strides 8-128)
  or any timm model with stride-8/16/32 features through `crowdseg.models.backbone.create_backbone`
  and torchvision's `FeaturePyramidNetwork`. Weights only from a local file.
- Head: torchvision's FCOS head modules (class tower + logits, box tower + regression + centre-ness)
  run by `BoxInst.forward`, which keeps what torchvision's FCOS discards: the box-tower features
  (input of the `controller`, a 3x3 conv giving every location its dynamic mask-head parameters)
  and the flat location index of every prediction.
- Mask branch on P3-P5 (`MaskBranch`, stride 8) and the dynamic mask head (`dynamic_mask_logits`):
  three 1x1 layers (8 channels) on [relative coordinates, mask features], all instances at once as
  one grouped convolution; `aligned_bilinear` x2 to the mask output stride 4.
- `postprocess`: score threshold, pre-NMS top-k, `batched_nms`, top detections, each keeping its
  image and location index so its dynamic parameters can be gathered; `paste_masks` turns stride-4
  logits into full-resolution binary masks in chunks.

No config lookups here: constructors take plain values (`build_boxinst` is the factory).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.ops import FrozenBatchNorm2d, batched_nms
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from crowdseg.errors import ConfigError
from crowdseg.models.fcos_geometry import DEFAULT_SIZES_OF_INTEREST, decode_boxes
from crowdseg.models.backbone import Normalize

FPN_STRIDES = (8, 16, 32, 64, 128)
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                       "resnext101_32x8d", "wide_resnet50_2")


# ------------------------------------------------------------------------------------ upsampling

def aligned_bilinear(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample (N, C, h, w) by an integer `factor` to (N, C, factor*h, factor*w), pixel centres aligned.

    As AdelaiDet: replicate-pad right/bottom by 1, bilinear resize to (factor*h + 1, factor*w + 1)
    with align_corners=True, replicate-pad left/top by factor // 2, crop to (factor*h, factor*w).
    Input pixel (i, j) lands at output (factor*i + factor//2 ... ) so the corner values are kept.
    """
    if tensor.dim() != 4:
        raise ValueError(f"aligned_bilinear expects (N, C, h, w), got {tuple(tensor.shape)}")
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    factor = int(factor)
    if factor == 1:
        return tensor
    h, w = tensor.shape[2:]
    tensor = F.pad(tensor, (0, 1, 0, 1), mode="replicate")
    tensor = F.interpolate(tensor, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    tensor = F.pad(tensor, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return tensor[:, :, :factor * h, :factor * w]


def compute_locations(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """(height*width, 2) xy input-pixel centres of the cells of a stride-`stride` map, row-major."""
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


# -------------------------------------------------------------------------------------- backbone

class FPNBackbone(nn.Module):
    """Images (B, 3, H, W) RGB in [0, 1] -> [P3, P4, P5, P6, P7], each (B, out_channels, H/s, W/s)."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.normalize = Normalize()
        self.body = body
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(self.normalize(images)).values())


class _TimmFPN(nn.Module):
    def __init__(self, features: nn.Module, out_channels: int):
        super().__init__()
        self.features = features
        self.fpn = FeaturePyramidNetwork(list(features.channels), out_channels,
                                         extra_blocks=LastLevelP6P7(out_channels, out_channels))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.features(x))))


def build_fpn_backbone(name: str, pretrained: Optional[str] = None, fpn_channels: int = 256, norm: str = "auto",
                       trainable_layers: int = 5) -> FPNBackbone:
    """P3-P7 FPN backbone: a torchvision ResNet (`TORCHVISION_RESNETS`) or any timm model by name.

    pretrained: a local weights file (torchvision / timm state dict) or None (random init).
    norm: "bn", "frozen_bn" or "auto" (frozen with pretrained weights, else trainable BN) for the
    torchvision ResNets; trainable_layers: how many of (conv1, layer1..4) train (ResNets only).
    """
    if name in TORCHVISION_RESNETS:
        if norm == "auto":
            norm = "frozen_bn" if pretrained else "bn"
        if norm not in ("bn", "frozen_bn"):
            raise ConfigError(f"key 'boxinst.model.norm': {norm!r} is not one of auto, bn, frozen_bn")
        resnet = torchvision.models.get_model(name, weights=None,
                                              norm_layer=FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d)
        if pretrained:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise ConfigError(f"key 'boxinst.model.pretrained': backbone weights file not found: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            missing, _ = resnet.load_state_dict(state, strict=False)
            if [k for k in missing if not k.startswith("fc.")]:
                raise ConfigError(f"key 'boxinst.model.pretrained': {path} is not a {name} state dict "
                                  f"(missing {missing[:3]})")
        layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:max(0, min(trainable_layers, 5))]
        if "conv1" in layers:
            layers.append("bn1")
        for pname, param in resnet.named_parameters():
            if all(not pname.startswith(layer) for layer in layers):
                param.requires_grad_(False)
        in_channels = [resnet.inplanes // 8, resnet.inplanes // 4, resnet.inplanes // 2, resnet.inplanes][1:]
        body = BackboneWithFPN(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, fpn_channels,
                               extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        return FPNBackbone(body, fpn_channels)
    from crowdseg.models.backbone import create_backbone

    try:
        features = create_backbone(name, pretrained, reductions=(8, 16, 32))
    except ConfigError as err:
        raise ConfigError(str(err).replace("'model.", "'boxinst.model.")) from None
    return FPNBackbone(_TimmFPN(features, fpn_channels), fpn_channels)


# ----------------------------------------------------------------------------------- mask branch

def _conv_norm_relu(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "gn":
        layers.append(nn.GroupNorm(min(32, cout), cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MaskBranch(nn.Module):
    """CondInst mask branch: [P3, P4, P5] (B, C_fpn, H/8 ...) -> mask features (B, out_channels, H/8, W/8).

    Each level: conv3x3 (channels) + norm + ReLU; P4, P5 upsampled to P3 with `aligned_bilinear`
    and summed; `num_convs` conv3x3 + norm + ReLU; a 1x1 conv to `out_channels` (16 in BoxInst).
    """

    def __init__(self, in_channels: int, channels: int = 128, num_convs: int = 4, out_channels: int = 16,
                 norm: str = "bn"):
        super().__init__()
        if norm not in ("bn", "gn", "none"):
            raise ValueError(f"mask branch norm must be bn, gn or none, got {norm!r}")
        self.refine = nn.ModuleList([_conv_norm_relu(in_channels, channels, norm) for _ in range(3)])
        self.tower = nn.Sequential(*[_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)],
                                   nn.Conv2d(channels, out_channels, 1))
        self.out_channels = out_channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.refine[0](features[0])
        for level in (1, 2):
            y = self.refine[level](features[level])
            factor = x.shape[2] // y.shape[2]
            y = aligned_bilinear(y, factor)[:, :, :x.shape[2], :x.shape[3]]
            x = x + y
        return self.tower(x)


# ---------------------------------------------------------------------------------- dynamic head

def dynamic_param_shapes(in_channels: int = 16, channels: int = 8, num_layers: int = 3) -> tuple[list[int], list[int]]:
    """(weight_nums, bias_nums) of the dynamic mask head; the input has in_channels + 2 (coords) channels.

    With 16 mask channels, 8 channels, 3 layers: weights [144, 64, 8], biases [8, 8, 1], 233 in all.
    """
    weight_nums, bias_nums = [], []
    for layer in range(num_layers):
        cin = in_channels + 2 if layer == 0 else channels
        cout = 1 if layer == num_layers - 1 else channels
        weight_nums.append(cin * cout)
        bias_nums.append(cout)
    return weight_nums, bias_nums


def dynamic_param_count(in_channels: int = 16, channels: int = 8, num_layers: int = 3) -> int:
    weights, biases = dynamic_param_shapes(in_channels, channels, num_layers)
    return sum(weights) + sum(biases)


def split_dynamic_params(params: torch.Tensor, in_channels: int = 16, channels: int = 8,
                         num_layers: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split (N, P) parameters (all weights first, then all biases) into grouped-conv weights and biases.

    Returns weights [(N * cout_l, cin_l, 1, 1)] and biases [(N * cout_l,)] per layer.
    """
    n = params.shape[0]
    weight_nums, bias_nums = dynamic_param_shapes(in_channels, channels, num_layers)
    if params.shape[1] != sum(weight_nums) + sum(bias_nums):
        raise ValueError(f"expected {sum(weight_nums) + sum(bias_nums)} dynamic parameters, got {params.shape[1]}")
    parts = torch.split(params, weight_nums + bias_nums, dim=1)
    weights, biases = [], []
    for layer in range(num_layers):
        cout = bias_nums[layer]
        cin = weight_nums[layer] // cout
        weights.append(parts[layer].reshape(n * cout, cin, 1, 1))
        biases.append(parts[num_layers + layer].reshape(n * cout))
    return weights, biases


def relative_coords(instance_locations: torch.Tensor, height: int, width: int, stride: int,
                    soi: torch.Tensor) -> torch.Tensor:
    """(N, 2, h, w): (instance location - pixel location) / soi of each instance, x then y.

    instance_locations (N, 2) xy input pixels; the pixels are those of a stride-`stride` map; soi (N,).
    """
    grid = compute_locations(height, width, stride, instance_locations.device)            # (hw, 2)
    rel = instance_locations[:, None, :].float() - grid[None]                             # (N, hw, 2)
    rel = rel / soi.float()[:, None, None]
    return rel.permute(0, 2, 1).reshape(-1, 2, height, width)


def dynamic_mask_logits(mask_feats: torch.Tensor, mask_stride: int, params: torch.Tensor, image_index: torch.Tensor,
                        instance_locations: torch.Tensor, soi: torch.Tensor, channels: int = 8,
                        num_layers: int = 3) -> torch.Tensor:
    """Mask logits of N instances at the mask-feature stride, all at once as one grouped convolution.

    mask_feats: (B, C, h, w); params: (N, P) dynamic parameters; image_index: (N,) the image of each
    instance; instance_locations: (N, 2); soi: (N,). Returns (N, h, w).
    """
    n = params.shape[0]
    _, c, h, w = mask_feats.shape
    if n == 0:
        return mask_feats.new_zeros(0, h, w)
    coords = relative_coords(instance_locations, h, w, mask_stride, soi).to(mask_feats.dtype)
    x = torch.cat([coords, mask_feats[image_index]], dim=1).reshape(1, n * (c + 2), h, w)
    weights, biases = split_dynamic_params(params, c, channels, num_layers)
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), groups=n)
        if layer < num_layers - 1:
            x = F.relu(x)
    return x.reshape(n, h, w)


def dynamic_mask_logits_bmm(mask_feats: torch.Tensor, mask_stride: int, params: torch.Tensor, image_index: torch.Tensor,
                            instance_locations: torch.Tensor, soi: torch.Tensor, channels: int = 8,
                            num_layers: int = 3) -> torch.Tensor:
    """`dynamic_mask_logits` with each 1x1 layer as one batched matrix product (N, out, in) @ (N, in, hw):
    the same numbers, another kernel (`benchmarks/boxinst.py` compares the three on the machine at hand)."""
    n = params.shape[0]
    _, c, h, w = mask_feats.shape
    if n == 0:
        return mask_feats.new_zeros(0, h, w)
    coords = relative_coords(instance_locations, h, w, mask_stride, soi).to(mask_feats.dtype)
    x = torch.cat([coords, mask_feats[image_index]], dim=1).reshape(n, c + 2, h * w)
    weights, biases = split_dynamic_params(params, c, channels, num_layers)
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        cout = bias.shape[0] // n
        x = torch.baddbmm(bias.reshape(n, cout, 1).to(x.dtype), weight.reshape(n, cout, -1).to(x.dtype), x)
        if layer < num_layers - 1:
            x = F.relu(x)
    return x.reshape(n, h, w)


def dynamic_mask_logits_loop(mask_feats: torch.Tensor, mask_stride: int, params: torch.Tensor,
                             image_index: torch.Tensor, instance_locations: torch.Tensor, soi: torch.Tensor,
                             channels: int = 8, num_layers: int = 3) -> torch.Tensor:
    """`dynamic_mask_logits` one instance at a time (the reference the benchmark compares with)."""
    n = params.shape[0]
    _, c, h, w = mask_feats.shape
    out = []
    for i in range(n):
        coords = relative_coords(instance_locations[i:i + 1], h, w, mask_stride, soi[i:i + 1]).to(mask_feats.dtype)
        x = torch.cat([coords, mask_feats[image_index[i]:image_index[i] + 1]], dim=1)
        weights, biases = split_dynamic_params(params[i:i + 1], c, channels, num_layers)
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = F.conv2d(x, weight, bias)
            if layer < num_layers - 1:
                x = F.relu(x)
        out.append(x[:, 0])
    return torch.cat(out) if out else mask_feats.new_zeros(0, h, w)


# -------------------------------------------------------------------------------------- detector

class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class BoxInst(nn.Module):
    """FCOS + CondInst dynamic mask head (the BoxInst architecture).

    `forward(images)` with images (B, 3, H, W) RGB in [0, 1], H and W multiples of 32 (`pad_to`)
    returns a dict:
      cls_logits (B, M, num_classes), box_ltrb (B, M, 4) distances in pixels, ctrness (B, M) logits,
      params (B, M, P) dynamic parameters, mask_feats (B, C_mask, H/8, W/8), locations (M, 2) xy,
      levels (M,) long; M is the number of locations over P3-P7, level after level, row-major.
    """

    strides = FPN_STRIDES

    def __init__(self, backbone: FPNBackbone, num_classes: int = 1, head_convs: int = 4,
                 mask_branch_channels: int = 128, mask_branch_convs: int = 4, mask_channels: int = 16,
                 mask_branch_norm: str = "bn", dynamic_channels: int = 8, dynamic_layers: int = 3,
                 mask_out_stride: int = 4, sizes_of_interest: Sequence[float] = DEFAULT_SIZES_OF_INTEREST):
        super().__init__()
        c = backbone.out_channels
        self.backbone = backbone
        # torchvision's FCOS head modules; GroupNorm with at least 2 channels per group, so a 1x1 P7
        # of a single small image still normalises
        norm = partial(nn.GroupNorm, min(32, c // 2))
        self.head = nn.Module()
        self.head.classification_head = FCOSClassificationHead(c, 1, num_classes, head_convs, norm_layer=norm)
        self.head.regression_head = FCOSRegressionHead(c, 1, head_convs, norm_layer=norm)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.num_params = dynamic_param_count(mask_channels, dynamic_channels, dynamic_layers)
        self.controller = nn.Conv2d(c, self.num_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)
        self.mask_branch = MaskBranch(c, mask_branch_channels, mask_branch_convs, mask_channels, mask_branch_norm)
        self.num_classes = num_classes
        self.dynamic_channels, self.dynamic_layers = dynamic_channels, dynamic_layers
        self.mask_feat_stride, self.mask_out_stride = FPN_STRIDES[0], mask_out_stride
        self.sizes_of_interest = tuple(float(s) for s in sizes_of_interest)
        soi = [*self.sizes_of_interest, self.sizes_of_interest[-1] * 2]
        self.register_buffer("level_soi", torch.tensor(soi, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of 32 (use pad_to)")
        features = self.backbone(images)
        cls_head, reg_head = self.head.classification_head, self.head.regression_head
        cls, ltrb, ctr, params, locations, levels = [], [], [], [], [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            h, w = feature.shape[2:]
            cls_tower = cls_head.conv(feature)
            box_tower = reg_head.conv(feature)
            cls.append(cls_head.cls_logits(cls_tower).flatten(2).transpose(1, 2))            # (B, hw, C)
            reg = F.relu(self.scales[level](reg_head.bbox_reg(box_tower))) * stride
            ltrb.append(reg.flatten(2).transpose(1, 2))                                         # (B, hw, 4)
            ctr.append(reg_head.bbox_ctrness(box_tower).flatten(1))                            # (B, hw)
            params.append(self.controller(box_tower).flatten(2).transpose(1, 2))              # (B, hw, P)
            locations.append(compute_locations(h, w, stride, images.device))
            levels.append(torch.full((h * w,), level, dtype=torch.long, device=images.device))
        return {"cls_logits": torch.cat(cls, 1), "box_ltrb": torch.cat(ltrb, 1), "ctrness": torch.cat(ctr, 1),
                "params": torch.cat(params, 1), "mask_feats": self.mask_branch(features[:3]),
                "locations": torch.cat(locations), "levels": torch.cat(levels)}

    def mask_logits(self, outputs: dict[str, torch.Tensor], image_index: torch.Tensor,
                    location_index: torch.Tensor) -> torch.Tensor:
        """Stride-4 mask logits (N, H/4, W/4) of the instances at (image_index (N,), location_index (N,))."""
        params = outputs["params"][image_index, location_index]
        soi = self.level_soi[outputs["levels"][location_index]]
        logits = dynamic_mask_logits(outputs["mask_feats"], self.mask_feat_stride, params, image_index,
                                     outputs["locations"][location_index], soi, self.dynamic_channels,
                                     self.dynamic_layers)
        return aligned_bilinear(logits[:, None], self.mask_feat_stride // self.mask_out_stride)[:, 0]


# ------------------------------------------------------------------------------------ inference

def pad_to(images: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad (B, 3, H, W) at the right / bottom so H and W are multiples of `multiple`."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % multiple, 0, -h % multiple))


@torch.no_grad()
def postprocess(outputs: dict[str, torch.Tensor], image_sizes: torch.Tensor, score_threshold: float = 0.05,
                pre_nms_topk: int = 1000, nms_threshold: float = 0.6, max_detections: int = 100) -> list[dict]:
    """Detections of every image, each keeping its location index.

    image_sizes: (B, 2) (H, W) of the unpadded images (boxes are clipped to them, locations
    outside are dropped). Per image: candidates with class probability > score_threshold, score =
    sqrt(prob * centre-ness), the top `pre_nms_topk`, `batched_nms` per class, the best
    `max_detections`. Returns per image {"boxes" (K, 4), "scores" (K,), "labels" (K,),
    "locations" (K,) long flat location index}.
    """
    probs_all = outputs["cls_logits"].sigmoid()
    ctr_all = outputs["ctrness"].sigmoid()
    locations = outputs["locations"]
    results = []
    for b in range(probs_all.shape[0]):
        h, w = (int(v) for v in image_sizes[b])
        probs = probs_all[b]
        inside = (locations[:, 0] < w) & (locations[:, 1] < h)
        loc_idx, label = torch.nonzero((probs > score_threshold) & inside[:, None], as_tuple=True)
        scores = torch.sqrt(probs[loc_idx, label] * ctr_all[b, loc_idx])
        if scores.numel() > pre_nms_topk:
            top = scores.topk(pre_nms_topk).indices
            loc_idx, label, scores = loc_idx[top], label[top], scores[top]
        boxes = decode_boxes(locations[loc_idx], outputs["box_ltrb"][b, loc_idx])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = batched_nms(boxes, scores, label, nms_threshold)[:max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": label[keep],
                        "locations": loc_idx[keep]})
    return results


def paste_masks(mask_logits: torch.Tensor, valid_size: tuple[int, int], out_size: tuple[int, int],
                mask_out_stride: int = 4, threshold: float = 0.5, chunk: int = 32) -> torch.Tensor:
    """Full-resolution binary masks from stride-`mask_out_stride` logits, `chunk` instances at a time.

    mask_logits (N, h, w) of a padded input; valid_size (H', W') of the (resized) image inside the
    padding; out_size (H, W) of the original image. sigmoid, `aligned_bilinear` x stride, crop to
    valid_size, bilinear resize to out_size, > threshold. Returns (N, H, W) bool.
    """
    n = mask_logits.shape[0]
    out = torch.zeros((n, *out_size), dtype=torch.bool, device=mask_logits.device)
    for start in range(0, n, max(chunk, 1)):
        probs = aligned_bilinear(mask_logits[start:start + chunk, None].sigmoid(), mask_out_stride)
        probs = probs[:, :, :valid_size[0], :valid_size[1]]
        if tuple(probs.shape[-2:]) != tuple(out_size):
            probs = F.interpolate(probs, size=tuple(out_size), mode="bilinear", align_corners=False)
        out[start:start + chunk] = probs[:, 0] > threshold
    return out


def predict_masks(model: "BoxInst", outputs: dict[str, torch.Tensor], image: int, locations: torch.Tensor,
                  valid_size: tuple[int, int], out_size: tuple[int, int], threshold: float = 0.5,
                  chunk: int = 32) -> torch.Tensor:
    """(K, H, W) bool masks of the K detections at `locations` (K,) of image `image`, `chunk` at a time
    through the dynamic head and `paste_masks` (peak memory grows with the chunk, not with K)."""
    k = locations.shape[0]
    out = torch.zeros((k, *out_size), dtype=torch.bool, device=locations.device)
    for start in range(0, k, max(chunk, 1)):
        part = locations[start:start + chunk]
        logits = model.mask_logits(outputs, torch.full_like(part, image), part)
        out[start:start + chunk] = paste_masks(logits, valid_size, out_size, model.mask_out_stride, threshold, chunk)
    return out


def build_boxinst(backbone: str = "resnet50", pretrained: Optional[str] = None, fpn_channels: int = 256,
                  norm: str = "auto", trainable_layers: int = 5, **kwargs) -> BoxInst:
    """A `BoxInst` on `build_fpn_backbone(backbone, ...)`; kwargs go to `BoxInst`."""
    return BoxInst(build_fpn_backbone(backbone, pretrained, fpn_channels, norm, trainable_layers), **kwargs)
