"""A batched SAM predictor: one image embedding, many prompts, logits only where they are needed.

Differences from `segment_anything.SamPredictor` (same model, same weights):

- `encode` takes an image that is already resized to fit the model input (see `resize_to_input`,
  our own antialiased bilinear resize of a (3, H, W) tensor; SAM's `apply_image_torch` reads the
  target size from the wrong axes of a BCHW tensor and is not used).
- `decode` runs the prompt encoder and the mask decoder's two-way transformer for a whole batch of
  prompts, then upsamples the decoder features only inside a small window per prompt. The
  decoder's upscaling (two stride-2 transposed convolutions, a per-pixel LayerNorm, GELUs) and the
  hypernetwork product are pixel-local, so a window of the upsampled logits is *exactly* the same
  window of SAM's full 256x256 low-resolution logits, at a fraction of the cost and memory. No
  full-resolution mask is ever built here; callers sample the window at the pixels they need.
- The two-way transformer runs through our own forward with the model's weights
  (`two_way_transformer`): without a mask prompt the image side of its first layer is the same
  for every prompt and is computed once, and attention uses `scaled_dot_product_attention`.

The caller chunks prompts (`prompt_chunk`) so the memory of one `decode` call is bounded:
the transformer holds a copy of the image embedding per prompt.

Coordinates: the *input frame* is the padded square the encoder sees (`input_size` pixels a side);
a point at continuous input position X (pixel k covers [k, k+1)) is passed as X - 0.5, because the
prompt encoder adds 0.5 (SAM's convention for pixel indices). The *low-res frame* is the decoder's
logit grid, `input_size / 4` a side; embedding cells are `patch` input pixels (16) = 4 low-res pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ImageEmbedding:
    features: torch.Tensor          # (1, C, E, E) image embedding
    input_hw: tuple[int, int]       # (h, w) of the resized image inside the padded input


def resize_to_input(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Resize `image` (3, H, W) float to `size_hw` (h, w): bilinear, antialiased when shrinking."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image
    return F.interpolate(image[None], size=tuple(size_hw), mode="bilinear", align_corners=False,
                         antialias=True)[0]


class BatchedSamPredictor:
    """Wraps a SAM model (segment-anything or MobileSAM `Sam`) for batched, windowed decoding."""

    def __init__(self, model: nn.Module, prompt_chunk: int = 128):
        if prompt_chunk < 1:
            raise ValueError(f"prompt_chunk must be >= 1, got {prompt_chunk}")
        self.model = model.eval()
        self.prompt_chunk = int(prompt_chunk)

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def input_size(self) -> int:
        return int(self.model.prompt_encoder.input_image_size[0])

    @property
    def embed_size(self) -> int:
        return int(self.model.prompt_encoder.image_embedding_size[0])

    @property
    def patch(self) -> int:
        """Input pixels per embedding cell."""
        return self.input_size // self.embed_size

    @property
    def low_res_size(self) -> int:
        return 4 * self.embed_size

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> ImageEmbedding:
        """Embed `image` (3, h, w) float RGB in [0, 1], already resized so max(h, w) <= input_size."""
        h, w = image.shape[-2:]
        if max(h, w) > self.input_size:
            raise ValueError(f"image {h}x{w} is larger than the model input {self.input_size}; resize it first")
        x = image.to(self.device, torch.float32) * 255.0
        x = (x - self.model.pixel_mean) / self.model.pixel_std
        x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h))
        return ImageEmbedding(self.model.image_encoder(x[None]), (int(h), int(w)))

    @torch.inference_mode()
    def decode(self, embedding: ImageEmbedding, coords: torch.Tensor, labels: torch.Tensor,
               origins: torch.Tensor, cells: int, boxes: Optional[torch.Tensor] = None,
               mask_input: Optional[torch.Tensor] = None, multimask: bool = True,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts; return logits in one window per prompt and the predicted IoUs.

        coords: (B, N, 2) float, xy in the input frame (minus 0.5, see the module docstring);
        labels: (B, N) 1 positive, 0 negative, -1 padding; boxes: (B, 4) xyxy or None;
        mask_input: (B, 1, L, L) low-res logits prompt or None;
        origins: (B, 2) long, (row, col) of each window's first embedding cell;
        cells: window side in embedding cells (the same for the batch).
        Returns logits (B, C, 4 * cells, 4 * cells) in the low-res frame starting at 4 * origins,
        and iou (B, C); C = 3 with `multimask`, else 1 (SAM's single-mask token).
        """
        model, dec = self.model, self.model.mask_decoder
        device = self.device
        coords, labels = coords.to(device, torch.float32), labels.to(device)
        boxes = boxes.to(device, torch.float32) if boxes is not None else None
        mask_input = mask_input.to(device, torch.float32) if mask_input is not None else None
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=boxes, masks=mask_input)
        b = sparse.shape[0]

        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens[None].expand(b, -1, -1), sparse], dim=1)
        pos = model.prompt_encoder.get_dense_pe()
        # without a mask prompt the dense prompt is the same "no mask" embedding for every prompt
        image = embedding.features + (dense if mask_input is not None else dense[:1])
        hs, src = two_way_transformer(dec.transformer, image, pos, tokens)
        iou = dec.iou_prediction_head(hs[:, 0, :])
        mask_tokens = hs[:, 1:1 + dec.num_mask_tokens, :]

        e = self.embed_size
        src = src.transpose(1, 2).reshape(b, -1, e, e)
        cells = int(min(cells, e))
        offsets = torch.arange(cells, device=device)
        origins = origins.to(device).clamp(0, e - cells)
        rows = (origins[:, 0:1] + offsets)[:, :, None]      # (B, cells, 1)
        cols = (origins[:, 1:2] + offsets)[:, None, :]      # (B, 1, cells)
        window = src[torch.arange(b, device=device)[:, None, None], :, rows, cols]  # (B, cells, cells, C)
        upscaled = dec.output_upscaling(window.permute(0, 3, 1, 2))                 # (B, C', 4c, 4c)
        hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
        side = upscaled.shape[-1]
        logits = (hyper @ upscaled.flatten(2)).view(b, -1, side, side)

        keep = slice(1, None) if multimask else slice(0, 1)
        return logits[:, keep], iou[:, keep]



def two_way_transformer(transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor,
                        tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's `TwoWayTransformer.forward` with its own weights, for B prompts of one image.

    image: (1, C, h, w) when all prompts share it (no mask prompt) or (B, C, h, w); image_pe:
    (1, C, h, w); tokens: (B, T, C). Returns (queries (B, T, C), keys (B, h*w, C)) as the original,
    up to float rounding. Two differences in how, not what: with a shared image, the first
    layer's image-side projections (token-to-image keys and values, image-to-token queries) are
    computed once instead of once per prompt; and attention runs through
    `scaled_dot_product_attention` (no materialised attention matrix, no head reshuffling copies).
    """
    keys = image.flatten(2).permute(0, 2, 1)                      # (1 or B, HW, C)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        if i == 0 and layer.skip_first_layer_pe:
            queries = layer.norm1(_attention(layer.self_attn, queries, queries, queries))
        else:
            q = queries + tokens
            queries = layer.norm1(queries + _attention(layer.self_attn, q, q, queries))
        k = keys + key_pe
        queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, queries + tokens, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _attention(layer.cross_attn_image_to_token, k, queries + tokens, queries))
    out = _attention(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + out), keys


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything `Attention.forward` (q, k, v: (B or 1, N, C), broadcast over the batch)."""
    heads = attn.num_heads
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2)
               for x in (attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)))          # (B, heads, N, c)
    batch = max(q.shape[0], k.shape[0])
    q, k, v = (x.expand(batch, -1, -1, -1) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)                 # softmax(q k^T / sqrt(c)) v
    return attn.out_proj(out.transpose(1, 2).flatten(2))
