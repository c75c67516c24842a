"""Pictures people would rather look at than read: prediction overlays, instance-map colouring (the
one palette of every picture) and the sample grid of `crowdseg show`."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from crowdseg.geometry import point_pixels
from crowdseg.io import atomic_path

GT_COLOR = (0, 255, 0)      # RGB green: ground-truth points
PRED_COLOR = (255, 40, 40)  # RGB red: predicted points
MIN_PICTURE_SIDE = 512      # smaller images are enlarged for display (a 128 px crop is a smudge on wandb)
CAPTION_HEIGHT = 22


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def enlarge(rgb: np.ndarray, min_side: int = MIN_PICTURE_SIDE) -> tuple[np.ndarray, int]:
    """A small (H, W, 3) image enlarged by a whole factor (nearest neighbour, pixels stay crisp) so
    its long side is at least `min_side`; returns the picture and the factor (1: unchanged)."""
    factor = max(1, -(-min_side // max(rgb.shape[:2])))
    if factor == 1:
        return rgb, 1
    return cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST), factor


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
                radius: int = 2, cross: bool = False, scale: int = 1) -> np.ndarray:
    """Draw xy `points` (N, 2) on a copy of an (H, W, 3) uint8 RGB image: dots, or crosses.
    `scale`: the image is the points' image enlarged that many times (see `enlarge`)."""
    out = np.ascontiguousarray(image.copy())
    pts = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    rows, cols = point_pixels(pts.reshape(-1, 2) * scale)
    for x, y in zip(cols, rows):
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
    canvas, f = enlarge(canvas)
    canvas = draw_points(canvas, gt_points, GT_COLOR, radius=3, scale=f)
    canvas = draw_points(canvas, pred_points, PRED_COLOR, radius=3, cross=True, scale=f)
    return with_caption(canvas, f"gt {len(gt_points)}  pred {len(pred_points)}")


def with_caption(canvas: np.ndarray, text: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image with a black strip below it holding `text` in white."""
    caption = np.zeros((CAPTION_HEIGHT, canvas.shape[1], 3), np.uint8)
    cv2.putText(caption, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([canvas, caption], 0)


def heatmap(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W, 3) uint8 RGB jet colours, resized to `size` (H, W), scaled to its max."""
    v = np.asarray(values, dtype=np.float32)
    peak = float(v.max(initial=0.0))
    scaled = np.clip(v / peak, 0, 1) if peak > 0 else np.zeros_like(v)
    resized = cv2.resize((scaled * 255).astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.applyColorMap(resized, cv2.COLORMAP_JET)[..., ::-1]


def density_overlay(image: torch.Tensor, density: torch.Tensor, gt_points: torch.Tensor,
                    count: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """Image blended with a heat map of `density` (h, w) (any stride; stretched over the image),
    GT points as green dots, and a caption with the GT count and the predicted `count` (default:
    the density's sum)."""
    canvas, f = enlarge(to_uint8_image(image))
    heat = heatmap(density.detach().float().cpu().numpy(), canvas.shape[:2])
    canvas = ((1 - alpha) * canvas + alpha * heat).round().astype(np.uint8)
    canvas = draw_points(canvas, gt_points, GT_COLOR, radius=3, scale=f)
    count = float(density.sum()) if count is None else float(count)
    return with_caption(canvas, f"gt {len(gt_points)}  pred {count:.1f}")


def picture_slots(batch_idx: int, batch_size: int, num_pictures: int) -> list[tuple[int, int]]:
    """[(index in the batch, running picture number)] of the first `num_pictures` images of an
    evaluation (assumes equal batch sizes before the last batch, as a DataLoader gives)."""
    first = batch_idx * batch_size
    return [(i, first + i) for i in range(batch_size) if first + i < num_pictures]


def save_pictures(run_dir: str | Path, stage: str, pictures: list[tuple[int, np.ndarray]],
                  loggers: list = (), step: int = 0) -> list[Path]:
    """Write `<run_dir>/pictures/<stage>_<number>.png` for each (number, RGB picture) and send the
    pictures to the wandb logger among `loggers`, if there is one."""
    paths = [save_png(Path(run_dir) / "pictures" / f"{stage}_{number:02d}.png", picture)
             for number, picture in pictures]
    wandb_logger = next((lg for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
    if wandb_logger is not None and pictures:
        wandb_logger.log_image(key=f"{stage}/predictions", images=[p for _, p in pictures], step=step)
    return paths


def draw_sample(sample: dict, cell: int = 320, mask_alpha: float = 0.45) -> np.ndarray:
    """(cell, cell, 3) uint8 RGB: a contract sample's image letterboxed into the cell, its instance
    masks coloured (`overlay_masks`), boxes in green, points as red dots, its name and count below."""
    rgb = to_uint8_image(torch.as_tensor(sample["image"]))
    h, w = rgb.shape[:2]
    s = cell / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    picture = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    id_map = sample.get("instance_map")
    if id_map is not None:
        ids = torch.as_tensor(id_map).cpu().numpy().astype(np.float32)
        ids = cv2.resize(ids, (nw, nh), interpolation=cv2.INTER_NEAREST).astype(np.int64)
        picture = overlay_masks(picture, ids, alpha=mask_alpha)
    canvas = np.full((cell, cell, 3), 24, np.uint8)
    canvas[:nh, :nw] = picture
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


def save_sample_grid(samples: list[dict], path: str | Path, ncols: int = 4, cell: int = 320) -> Path:
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
    return save_png(path, grid)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB (or single-channel / 16-bit) array as PNG, atomically."""
    path = Path(path)
    array = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(array)):
            raise OSError(f"could not write {path}")
    return path
