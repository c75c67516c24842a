"""BoxInst mask losses from boxes (METHODS.md B1-B3) and OverlapLoss (A3): pure functions on tensors.

Conventions: mask logits and targets live at the *mask output stride* `s` (4): pixel (i, j) of a
stride-`s` map samples input pixel (s // 2 + s * i, s // 2 + s * j) of the padded batch image, as
AdelaiDet's `[start::s, start::s]` subsampling. No mask annotation is used anywhere here.

- `box_masks`: box targets (B1); `image_valid_masks`: real pixels (not padding, optional bottom rows).
- `projection_loss`: squared-denominator Dice of the max-projections on both axes (B2).
- `pairwise_loss`: the colour-affinity term on 8 neighbours at dilation 2 (B3) with LAB colours
  (`rgb_to_lab`, `color_similarity`), edges whose centre lies inside the box, threshold 0.3.
- `overlap_loss`: sum(a * b) / sum(a + b) of each GT's sampled proposal against the proposals of
  the other GT instances of the same image, vectorised (one matmul), normalisation a parameter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OVERLAP_NORMALIZATIONS = ("instances", "pairs", "sum")

# sRGB (D65) -> XYZ, and the D65 white point (as skimage.color.rgb2lab)
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


# --------------------------------------------------------------------------------------- targets

def box_masks(boxes: torch.Tensor, height: int, width: int, stride: int = 4) -> torch.Tensor:
    """Box targets at `stride` (B1): (N, 4) xyxy input pixels -> (N, height // stride, width // stride) float.

    As AdelaiDet: the full-resolution mask is 1 on rows int(y1)..int(y2) and columns int(x1)..int(x2)
    (inclusive), then sampled at rows / columns stride // 2 + stride * k. `height`, `width`: the padded
    input size.
    """
    start = stride // 2
    h, w = height // stride, width // stride
    rows = torch.arange(h, device=boxes.device, dtype=torch.float32) * stride + start
    cols = torch.arange(w, device=boxes.device, dtype=torch.float32) * stride + start
    b = boxes.float().floor()
    in_y = (rows[None] >= b[:, 1:2]) & (rows[None] <= b[:, 3:4])   # (N, h)
    in_x = (cols[None] >= b[:, 0:1]) & (cols[None] <= b[:, 2:3])   # (N, w)
    return (in_y[:, :, None] & in_x[:, None, :]).float()


def image_valid_masks(image_sizes: torch.Tensor, height: int, width: int, stride: int = 4,
                      bottom_pixels_removed: torch.Tensor | float = 0.0) -> torch.Tensor:
    """(B, height // stride, width // stride) float: 1 on real pixels of each padded image.

    image_sizes: (B, 2) (H, W) of the unpadded images. `bottom_pixels_removed` (scalar or (B,)) rows
    at the bottom of each image are invalid too (AdelaiDet's COCO-specific 10 px; 0 for crowds).
    """
    start = stride // 2
    rows = torch.arange(height // stride, device=image_sizes.device, dtype=torch.float32) * stride + start
    cols = torch.arange(width // stride, device=image_sizes.device, dtype=torch.float32) * stride + start
    sizes = image_sizes.float()
    bottom = torch.as_tensor(bottom_pixels_removed, dtype=torch.float32, device=image_sizes.device).reshape(-1)
    valid_y = rows[None] < (sizes[:, 0:1] - bottom[:, None])
    valid_x = cols[None] < sizes[:, 1:2]
    return (valid_y[:, :, None] & valid_x[:, None, :]).float()


# ---------------------------------------------------------------------------------------- colour

def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE-LAB (D65) of sRGB colours: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) L in [0, 100], a, b.

    The same formulas as `skimage.color.rgb2lab` (sRGB gamma, D65 XYZ, CIE 1976 L*a*b*).
    """
    rgb = rgb.float().clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    lightness = torch.where(xyz[:, 1] > 0.008856, 116.0 * fy - 16.0, 903.3 * xyz[:, 1])
    return torch.stack([lightness, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def unfold_wo_center(x: torch.Tensor, kernel_size: int = 3, dilation: int = 2) -> torch.Tensor:
    """The k*k - 1 dilated neighbours of every pixel: (B, C, H, W) -> (B, C, k*k - 1, H, W).

    Neighbour n of pixel (i, j) is pixel (i + dy_n, j + dx_n) with (dy, dx) in
    dilation * {-1, 0, 1}^2 minus the centre, in raster order; zero outside the map ("same" padding).
    """
    b, c, h, w = x.shape
    padding = (kernel_size + (dilation - 1) * (kernel_size - 1)) // 2
    unfolded = F.unfold(x, kernel_size=kernel_size, padding=padding, dilation=dilation)
    unfolded = unfolded.reshape(b, c, kernel_size * kernel_size, h, w)
    centre = kernel_size * kernel_size // 2
    return torch.cat([unfolded[:, :, :centre], unfolded[:, :, centre + 1:]], dim=2)


def color_similarity(lab: torch.Tensor, valid: torch.Tensor, kernel_size: int = 3, dilation: int = 2,
                     theta: float = 2.0) -> torch.Tensor:
    """S_e = exp(-||lab_i - lab_j|| / theta) of every pixel and its 8 dilated neighbours.

    lab: (B, 3, h, w) LAB colours at the mask stride; valid: (B, h, w) real pixels.
    Returns (B, 8, h, w); an edge counts only when both of its pixels are valid (else S = 0).
    """
    neighbours = unfold_wo_center(lab, kernel_size, dilation)                 # (B, 3, 8, h, w)
    diff = torch.linalg.vector_norm(lab[:, :, None] - neighbours, dim=1)     # (B, 8, h, w)
    valid_n = unfold_wo_center(valid[:, None].float(), kernel_size, dilation)[:, 0]
    return torch.exp(-diff / theta) * valid_n * valid[:, None].float()


def image_lab(images: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """LAB colours of RGB images (B, 3, H, W) in [0, 1] average-pooled by `stride`: (B, 3, H/s, W/s)."""
    return rgb_to_lab(F.avg_pool2d(images.float(), kernel_size=stride, stride=stride))


# ----------------------------------------------------------------------------------------- terms

def dice_loss(x: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + eps) per row: (N, ...) -> (N,)."""
    x, target = x.flatten(1), target.flatten(1)
    return 1.0 - 2.0 * (x * target).sum(1) / ((x * x).sum(1) + (target * target).sum(1) + eps)


def projection_loss(mask_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Box-projection term (B2): mean over instances of Dice(max_y m, max_y b) + Dice(max_x m, max_x b).

    mask_logits: (N, h, w) logits; boxes: (N, h, w) box targets (`box_masks`). Scalar; 0 for N = 0.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    m = mask_logits.sigmoid()
    onto_x = dice_loss(m.amax(dim=1), boxes.amax(dim=1))   # max over rows: the (w,) x-projection
    onto_y = dice_loss(m.amax(dim=2), boxes.amax(dim=2))   # max over columns: the (h,) y-projection
    return (onto_x + onto_y).mean()


def pairwise_log_same(mask_logits: torch.Tensor, kernel_size: int = 3, dilation: int = 2) -> torch.Tensor:
    """log P(y_i = y_j) = log(m_i m_j + (1 - m_i)(1 - m_j)) for every pixel i and its 8 neighbours j.

    mask_logits (N, h, w) -> (N, 8, h, w), computed in log space (logsigmoid + logsumexp).
    """
    z = mask_logits[:, None]
    log_fg, log_bg = F.logsigmoid(z), F.logsigmoid(-z)
    log_fg_n = unfold_wo_center(log_fg, kernel_size, dilation)[:, 0]
    log_bg_n = unfold_wo_center(log_bg, kernel_size, dilation)[:, 0]
    return torch.logaddexp(log_fg + log_fg_n, log_bg + log_bg_n)


def pairwise_loss(mask_logits: torch.Tensor, similarity: torch.Tensor, boxes: torch.Tensor,
                  threshold: float = 0.3, kernel_size: int = 3, dilation: int = 2) -> torch.Tensor:
    """Colour-affinity term (B3): sum_e w_e (-log P(y_e = 1)) / max(sum_e w_e, 1).

    mask_logits: (N, h, w); similarity: (N, 8, h, w) colour similarity of each instance's image
    (`color_similarity`, indexed by image); boxes: (N, h, w) box targets. w_e = 1[S_e >= threshold]
    times 1[the edge's centre pixel lies in the box]. Scalar (the warm-up factor is the caller's).
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    weights = (similarity >= threshold).float() * boxes[:, None].float()
    loss = -pairwise_log_same(mask_logits, kernel_size, dilation)
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """min(step / warmup_steps, 1): the pairwise term's linear warm-up (1 when warmup_steps <= 0)."""
    return 1.0 if warmup_steps <= 0 else min(float(step) / warmup_steps, 1.0)


# -------------------------------------------------------------------------------------- overlap

def sample_one_per_group(groups: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One member of every group, uniformly at random: groups (P,) long -> indices (G,) into P, in increasing group order.

    Vectorised: every member draws a random key and each group keeps its largest.
    """
    if groups.numel() == 0:
        return groups.new_zeros(0)
    keys = torch.rand(groups.shape, generator=generator, device="cpu").to(groups.device)
    _, dense = torch.unique(groups, return_inverse=True)
    best = torch.full((int(dense.max()) + 1,), -1.0, device=groups.device).scatter_reduce(
        0, dense, keys, reduce="amax")
    chosen = torch.nonzero(keys == best[dense]).squeeze(1)
    # equal keys (probability ~0) would pick two members of a group: keep one
    chosen = chosen[dense[chosen].argsort(stable=True)]
    keep = torch.ones_like(chosen, dtype=torch.bool)
    keep[1:] = dense[chosen[1:]] != dense[chosen[:-1]]
    return chosen[keep]


def overlap_degree(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """O(a_g, b_p) = sum(a_g * b_p) / (sum(a_g + b_p) + eps) of every pair: a (G, ...) , b (P, ...) -> (G, P).

    In [0, 0.5] for masks in [0, 1]: 0 for disjoint masks, 0.5 for two identical binary masks.
    """
    a, b = a.flatten(1), b.flatten(1)
    return (a @ b.T) / (a.sum(1)[:, None] + b.sum(1)[None, :] + eps)


def overlap_loss(mask_probs: torch.Tensor, gt_ids: torch.Tensor, image_ids: torch.Tensor,
                 chosen: torch.Tensor, normalization: str = "instances", eps: float = 1e-6) -> torch.Tensor:
    """OverlapLoss (A3): sum over GT g and proposals p of another GT in g's image of O(m_g, m_p).

    mask_probs: (P, h, w) soft masks sigmoid(z) of the proposals; gt_ids: (P,) the GT instance of
    each proposal, unique across the batch; image_ids: (P,) its image; chosen: (G,) one proposal
    per GT (`sample_one_per_group(gt_ids)`). normalization: "instances" (divide by G), "pairs"
    (by the number of (g, p) pairs counted) or "sum". Scalar; 0 without pairs.
    """
    if normalization not in OVERLAP_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {OVERLAP_NORMALIZATIONS}, got {normalization!r}")
    if chosen.numel() == 0:
        return mask_probs.sum() * 0.0
    degree = overlap_degree(mask_probs[chosen], mask_probs, eps)                      # (G, P)
    pairs = (image_ids[chosen][:, None] == image_ids[None, :]) & (gt_ids[chosen][:, None] != gt_ids[None, :])
    total = (degree * pairs).sum()
    if normalization == "instances":
        return total / chosen.numel()
    if normalization == "pairs":
        return total / pairs.sum().clamp_min(1)
    return total
