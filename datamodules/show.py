"""`save_sample_grid`: a PNG of samples with their points, boxes and instance masks drawn."""
from __future__ import annotations

import math
import os

import cv2
import numpy as np
import torch

from crowdseg.io import atomic_path


def instance_colors(n: int) -> np.ndarray:
    """(n + 1, 3) uint8 RGB colours, index 0 black; the same id always gets the same colour."""
    rng = np.random.default_rng(12345)
    colors = rng.integers(40, 256, size=(max(n, 0) + 1, 3)).astype(np.uint8)
    colors[0] = 0
    return colors


def draw_sample(sample: dict, cell: int = 320, mask_alpha: float = 0.45) -> np.ndarray:
    """(cell, cell, 3) uint8 RGB: the image letterboxed into the cell with masks, boxes, points."""
    image = sample["image"]
    image = image.detach().cpu().float() if isinstance(image, torch.Tensor) else torch.as_tensor(image).float()
    rgb = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    h, w = rgb.shape[:2]
    s = cell / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    canvas_img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    id_map = sample.get("instance_map")
    if id_map is not None:
        ids = torch.as_tensor(id_map).cpu().numpy()
        ids = cv2.resize(ids.astype(np.float32), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(np.int64)
        colors = instance_colors(int(ids.max(initial=0)))
        fg = ids > 0
        blended = canvas_img.astype(np.float32)
        blended[fg] = (1 - mask_alpha) * blended[fg] + mask_alpha * colors[ids[fg]]
        canvas_img = blended.round().astype(np.uint8)
    canvas = np.full((cell, cell, 3), 24, np.uint8)
    canvas[:nh, :nw] = canvas_img
    boxes = sample.get("boxes")
    if boxes is not None:
        for b in torch.as_tensor(boxes).cpu().numpy().reshape(-1, 4):
            if np.isfinite(b).all():
                p0 = (int(round((b[0] + 0.5) * s - 0.5)), int(round((b[1] + 0.5) * s - 0.5)))
                p1 = (int(round((b[2] + 0.5) * s - 0.5)), int(round((b[3] + 0.5) * s - 0.5)))
                cv2.rectangle(canvas, p0, p1, (60, 220, 60), 1)
    points = torch.as_tensor(sample["points"]).cpu().numpy().reshape(-1, 2)
    radius = max(1, round(cell / 160))
    for x, y in points:
        c = (int(round((x + 0.5) * s - 0.5)), int(round((y + 0.5) * s - 0.5)))
        cv2.circle(canvas, c, radius + 1, (255, 255, 255), -1)
        cv2.circle(canvas, c, radius, (230, 30, 30), -1)
    name = str((sample.get("meta") or {}).get("name", ""))
    cv2.putText(canvas, f"{name} n={len(points)}"[:40], (4, cell - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def save_sample_grid(samples: list[dict], path: str | os.PathLike, ncols: int = 4, cell: int = 320) -> None:
    """Draw `samples` (contract dicts) into a grid of `ncols` columns and write it as PNG, atomically."""
    if not samples:
        raise ValueError("no samples to draw")
    ncols = max(1, min(ncols, len(samples)))
    nrows = math.ceil(len(samples) / ncols)
    grid = np.full((nrows * cell + (nrows + 1) * 4, ncols * cell + (ncols + 1) * 4, 3), 255, np.uint8)
    for i, sample in enumerate(samples):
        r, c = divmod(i, ncols)
        y, x = 4 + r * (cell + 4), 4 + c * (cell + 4)
        grid[y:y + cell, x:x + cell] = draw_sample(sample, cell)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buf.tobytes())
