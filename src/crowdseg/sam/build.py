"""Build a SAM model: segment-anything `vit_b|vit_l|vit_h`, MobileSAM `vit_t`, or a `tiny` test model.

Weights come only from a local checkpoint path (nothing is downloaded). A missing or wrong
checkpoint raises one `ConfigError` line naming the file, the expected model type and where the
official checkpoints are published.

`tiny` is a randomly initialised SAM for tests, built from segment-anything's own classes so it
runs the exact code paths of the real models, only smaller:

- image encoder: ViT with input 256x256, patch 16 (a 16x16 embedding grid, like SAM's 64x64 at
  1024), embed_dim 64, depth 2, 2 heads, windowed attention (window 8) in block 0 and global
  attention in block 1, relative positions, neck to 64 channels;
- prompt encoder: 64-d embeddings, mask input 64x64 (4x the embedding grid, as in SAM);
- mask decoder: two-way transformer (depth 2, 64-d, MLP 256, 4 heads), 3 multimask outputs,
  low-resolution logits 64x64 (input / 4, as in SAM).

Every model is returned in eval mode. A model built without checkpoint is initialised from
`seed` without touching the global random state, so every DDP rank builds the same weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from crowdseg.choices import MODEL_TYPES
from crowdseg.errors import ConfigError

_SAM_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
CHECKPOINT_SOURCES = {
    "vit_b": f"sam_vit_b_01ec64.pth from {_SAM_URL}",
    "vit_l": f"sam_vit_l_0b3195.pth from {_SAM_URL}",
    "vit_h": f"sam_vit_h_4b8939.pth from {_SAM_URL}",
    "vit_t": "weights/mobile_sam.pt from https://github.com/ChaoningZhang/MobileSAM",
    "tiny": "a state dict saved from crowdseg.sam.build_sam('tiny') (random test model, no official weights)",
}
# image_encoder.patch_embed.proj.weight output channels of each ViT encoder (to name a wrong checkpoint)
_ENCODER_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h", 64: "tiny"}


def build_sam(model_type: str, checkpoint: Optional[str] = None, device: str | torch.device = "cpu",
              seed: int = 0) -> nn.Module:
    """The SAM model of `model_type`, with weights from `checkpoint` (random from `seed` when None)."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"key 'sam.model_type': {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _ARCHITECTURES[model_type]()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_type)
    return model.to(device).eval()


def build_sam_from_config(sam: Any, device: str | torch.device = "cpu") -> nn.Module:
    """The SAM model of a `sam` config section (model_type, checkpoint, seed): what `crowdseg masks`
    and the RPS environment both use. A real SAM type without `sam.checkpoint` is a `ConfigError`
    naming where the official weights are published."""
    if sam.model_type != "tiny" and not sam.checkpoint:
        source = CHECKPOINT_SOURCES.get(sam.model_type, "the SAM README")
        raise ConfigError(f"key 'sam.checkpoint': model type {sam.model_type} needs a local checkpoint path "
                          f"(official weights: {source})")
    return build_sam(sam.model_type, sam.checkpoint, device=device, seed=sam.seed)


def load_checkpoint(model: nn.Module, path: str | Path, model_type: str) -> None:
    """Load the state dict at `path` into `model`; any problem is one `ConfigError` line."""
    path = Path(path)
    where = f"sam.checkpoint {path}"
    expect = f"expected a {model_type} checkpoint ({CHECKPOINT_SOURCES[model_type]})"
    if not path.is_file():
        raise ConfigError(f"{where}: file not found; {expect}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of any kind: the file is not a checkpoint
        raise ConfigError(f"{where}: not a PyTorch state dict ({type(err).__name__}); {expect}") from None
    for wrapper in ("model", "state_dict"):  # training checkpoints sometimes nest the weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: holds a {type(state).__name__}, not a state dict of tensors; {expect}")
    problem = _mismatch(model.state_dict(), state)
    if problem:
        guess = guess_model_type(state)
        hint = f"; it looks like a {guess} checkpoint (set sam.model_type: {guess})" if guess not in (None, model_type) else ""
        raise ConfigError(f"{where}: does not match model type {model_type} ({problem}){hint}; {expect}")
    model.load_state_dict(state)


def guess_model_type(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The model type a SAM state dict was saved from, when recognisable."""
    if any(k.startswith("image_encoder.patch_embed.seq.") for k in state):
        return "vit_t"  # TinyViT's convolutional patch embedding
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if isinstance(weight, torch.Tensor) and weight.ndim == 4:
        return _ENCODER_WIDTH.get(int(weight.shape[0]))
    return None


def _mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches, e.g. {k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}")
    return "; ".join(parts)


def _segment_anything(model_type: str) -> nn.Module:
    from segment_anything import sam_model_registry
    return sam_model_registry[model_type](checkpoint=None)


def _mobile_sam() -> nn.Module:
    try:
        from mobile_sam import sam_model_registry
    except ImportError:
        raise ConfigError("sam.model_type 'vit_t' needs MobileSAM: install the optional extra with "
                          "`uv pip install -e '.[mobilesam]'` (PyPI mobilesam-mirror==1.0.0, import name "
                          "mobile_sam)") from None
    return sam_model_registry["vit_t"](checkpoint=None)


def _tiny() -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    image_size, patch, dim = 256, 16, 64
    grid = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2, mlp_ratio=4.0,
            out_chans=dim, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=8, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=4 * dim, num_heads=4),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
    )


_ARCHITECTURES = {
    "vit_b": partial(_segment_anything, "vit_b"),
    "vit_l": partial(_segment_anything, "vit_l"),
    "vit_h": partial(_segment_anything, "vit_h"),
    "vit_t": _mobile_sam,
    "tiny": _tiny,
}
