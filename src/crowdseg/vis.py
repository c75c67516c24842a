"""Pictures people would rather look at than read: prediction overlays and instance-map colouring."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from crowdseg.io import atomic_path

GT_COLOR = (0, 255, 0)      # RGB green: ground-truth points
PRED_COLOR = (255, 40, 40)  # RGB red: predicted points


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def colorize_instances(instance_map: np.ndarray, seed: int = 0) -> np.ndarray:
    """(H, W) int id map -> (H, W, 3) uint8 RGB, background black, a stable colour per id."""
    ids = instance_map.astype(np.int64)
    palette = np.random.default_rng(seed).integers(60, 256, size=(int(ids.max(initial=0)) + 1, 3), dtype=np.uint8)
    palette[0] = 0
    return palette[ids]


def overlay_masks(image: np.ndarray, instance_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend coloured instances onto an (H, W, 3) uint8 RGB image."""
    colors = colorize_instances(instance_map)
    fg = (instance_map > 0)[..., None]
    return np.where(fg, (1 - alpha) * image + alpha * colors, image).astype(np.uint8)


def draw_points(image: np.ndarray, points: torch.Tensor | np.ndarray, color: tuple[int, int, int],
                radius: int = 2, cross: bool = False) -> np.ndarray:
    """Draw xy `points` (N, 2) on a copy of an (H, W, 3) uint8 RGB image: dots, or crosses."""
    out = np.ascontiguousarray(image.copy())
    pts = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    for x, y in np.round(pts).astype(int):
        if cross:
            cv2.drawMarker(out, (int(x), int(y)), color, cv2.MARKER_CROSS, 2 * radius + 3, 1)
        else:
            cv2.circle(out, (int(x), int(y)), radius, color, -1)
    return out


def point_overlay(image: torch.Tensor, gt_points: torch.Tensor, pred_points: torch.Tensor,
                  instance_map: torch.Tensor | None = None) -> np.ndarray:
    """Image (+ masks) with GT points as green dots and predictions as red crosses, plus a count caption."""
    canvas = to_uint8_image(image)
    if instance_map is not None:
        canvas = overlay_masks(canvas, instance_map.cpu().numpy())
    canvas = draw_points(canvas, gt_points, GT_COLOR, radius=2)
    canvas = draw_points(canvas, pred_points, PRED_COLOR, radius=2, cross=True)
    caption = np.zeros((18, canvas.shape[1], 3), np.uint8)
    cv2.putText(caption, f"gt {len(gt_points)}  pred {len(pred_points)}", (3, 13),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([canvas, caption], 0)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB (or single-channel / 16-bit) array as PNG, atomically."""
    path = Path(path)
    array = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(array)):
            raise OSError(f"could not write {path}")
    return path
