"""Pick one of SAM's multimask candidates per prompt, using the NNEC circle.

Scores are computed on the low-res cells within `context_factor` radii of the point (the *context
disc*; cells outside the resized image are ignored), so they do not depend on how prompts were
chunked:
- `iou_inside` (default): SAM's predicted IoU x the fraction of the candidate's area that lies
  inside the circle. A candidate that leaks over neighbours scores low even if SAM likes it.
- `disc_iou`: the IoU of the candidate with the circle (ignores SAM's own quality estimate).
A candidate with no foreground cell in the context disc scores 0. Leakage beyond the context disc
is not seen (it would also fill the ring between one and `context_factor` radii, which is).
"""
from __future__ import annotations

import torch

from crowdseg.choices import SELECTIONS


def select_candidates(logits: torch.Tensor, iou_pred: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor,
                      mode: str = "iou_inside", threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the best candidate per prompt.

    logits: (B, C, S, S) window logits; iou_pred: (B, C); inside, valid: (B, S, S) bool.
    Returns best (B,) long and scores (B, C) float.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}; expected one of {SELECTIONS}")
    fg = (logits > threshold) & valid[:, None]
    area = fg.sum((-2, -1)).float()
    hit = (fg & inside[:, None]).sum((-2, -1)).float()
    if mode == "iou_inside":
        scores = iou_pred.float() * torch.where(area > 0, hit / area.clamp(min=1), torch.zeros_like(area))
    else:
        disc = (inside & valid).sum((-2, -1)).float()[:, None]
        union = area + disc - hit
        scores = torch.where(union > 0, hit / union.clamp(min=1), torch.zeros_like(union))
    scores = torch.where(area > 0, scores, torch.zeros_like(scores))
    return scores.argmax(1), scores
