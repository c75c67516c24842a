"""Decode a `Record` into a *raw sample* (numpy), resize it, and convert it to the contract sample.

A raw sample is a dict of numpy arrays in the original layout:
`image` (H, W, C) uint8 with C = 1 (grayscale) or 3 (may be a read-only memmap from the cache),
`points` (N, 2) float32, `boxes` (N, 4) or None, further per-point box sets under keys ending in
`_boxes` (e.g. `head_boxes`), `point_attrs` {name: (N,)}, `ignore_boxes` (M, 4) or None,
`instance_map` (H, W) int32 or None, and `meta`.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from crowdseg.errors import DataError
from crowdseg.geometry import pixels_inside, point_pixels
from datamodules.readers.coco import rasterize_instances
from datamodules.readers.common import Record
from datamodules.readers.idmaps import read_id_map

RawSample = dict[str, Any]


def decode_image(path) -> np.ndarray:
    """(H, W, C) uint8, C = 1 for grayscale files, else 3 (RGB)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "I;16", "I", "F", "1"):
                arr = np.asarray(im.convert("L"))[..., None]
            else:
                arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    return arr


def instance_map_of(record: Record, size: tuple[int, int]) -> np.ndarray | None:
    """(H, W) int32 id map of `record` (file or polygons), renumbered after dropped points."""
    if record.mask_path is not None:
        id_map = read_id_map(record.mask_path)
        where = str(record.mask_path)
    elif record.polygons is not None:
        id_map = rasterize_instances(record.polygons, *size)
        where = record.source
    else:
        return None
    if id_map.shape != tuple(size):
        raise DataError(f"{where}: instance map is {id_map.shape[1]}x{id_map.shape[0]} but the image is {size[1]}x{size[0]}")
    if record.id_remap is not None:
        if id_map.size and id_map.max() >= len(record.id_remap):
            raise DataError(f"{where}: instance id {int(id_map.max())} but the annotation had {len(record.id_remap) - 1} points")
        id_map = record.id_remap[id_map]
    n = len(record.points)
    if id_map.size and id_map.max() > n:
        raise DataError(f"{where}: instance id {int(id_map.max())} but the image has only {n} points "
                        f"(id k must be the instance of point k - 1)")
    return id_map.astype(np.int32)


def record_labels(record: Record, dataset: str, orig_size: tuple[int, int]) -> RawSample:
    """Everything of a raw sample except the image and the instance map."""
    raw: RawSample = {
        "points": record.points.astype(np.float32),
        "boxes": None if record.boxes is None else record.boxes.astype(np.float32),
        "point_attrs": dict(record.point_attrs),
        "ignore_boxes": record.ignore_boxes,
        "meta": {"dataset": dataset, "name": record.name, "orig_size": tuple(int(v) for v in orig_size), "scale": 1.0,
                 "labeled": record.labeled, **({"labels": record.labels} if record.labels else {})},
    }
    raw.update({k: v.astype(np.float32) for k, v in record.point_boxes.items()})
    return raw


def load_record(record: Record, dataset: str, max_size: int | None = None) -> RawSample:
    """Decode `record` from its files; resize so the long side is at most `max_size`."""
    if record.image_path is None:
        raise DataError(f"{record.source}: image {record.name} is not available (no image folder was given)")
    image = decode_image(record.image_path)
    size = image.shape[:2]
    if record.size is not None and tuple(record.size) != tuple(size):
        raise DataError(f"{record.image_path}: decoded size {size[1]}x{size[0]} differs from the expected "
                        f"{record.size[1]}x{record.size[0]}")
    raw = record_labels(record, dataset, size)
    raw["image"] = image
    raw["instance_map"] = instance_map_of(record, size)
    return resize_raw(raw, max_size)


def target_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    if max_size is None or max(height, width) <= max_size:
        return height, width
    s = max_size / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def scale_points(points: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Pixel-index coordinates under a resize by (sx, sy): pixel centres map to pixel centres."""
    out = points.astype(np.float32).copy()
    out[:, 0] = (out[:, 0] + 0.5) * sx - 0.5
    out[:, 1] = (out[:, 1] + 0.5) * sy - 0.5
    return out


def scale_boxes(boxes: np.ndarray | None, sx: float, sy: float) -> np.ndarray | None:
    if boxes is None:
        return None
    return scale_points(boxes.reshape(-1, 2), sx, sy).reshape(-1, 4)


def nearest_resize(id_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize with pixel centres aligned (cv2.INTER_NEAREST is shifted)."""
    h, w = id_map.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return id_map[rows[:, None], cols[None, :]]


def own_pixel(id_map: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N,) bool: whether the pixel holding point k has id k + 1 (points outside the map: False)."""
    h, w = id_map.shape
    if len(points) == 0:
        return np.zeros(0, bool)
    rows, cols = point_pixels(points)
    inside = pixels_inside(rows, cols, h, w)
    held = np.zeros(len(points), bool)
    held[inside] = np.asarray(id_map)[rows[inside], cols[inside]] == np.flatnonzero(inside) + 1
    return held


def stamp_point_pixels(id_map: np.ndarray, points: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Write id k + 1 at the pixel of every point k in `which` (bool (N,)) that lies in the map.

    Resampling can move or erase an instance of one or two pixels; stamping keeps a point that was
    inside its own mask inside it after a resize or crop.
    """
    h, w = id_map.shape
    rows, cols = point_pixels(points)
    which = which & pixels_inside(rows, cols, h, w)
    id_map[rows[which], cols[which]] = np.flatnonzero(which) + 1
    return id_map


def resize_raw(raw: RawSample, max_size: int | None) -> RawSample:
    """Resize image, points, boxes and instance map together so the long side is <= max_size."""
    h, w = raw["image"].shape[:2]
    th, tw = target_size(h, w, max_size)
    if (th, tw) == (h, w):
        return raw
    sx, sy = tw / w, th / h
    out = dict(raw)
    image = cv2.resize(np.ascontiguousarray(raw["image"]), (tw, th), interpolation=cv2.INTER_AREA)
    out["image"] = image.reshape(th, tw, -1)
    out["points"] = scale_points(raw["points"], sx, sy)
    for key in box_keys(raw):
        out[key] = scale_boxes(raw[key], sx, sy)
    if raw.get("instance_map") is not None:
        held = own_pixel(raw["instance_map"], raw["points"])
        out["instance_map"] = stamp_point_pixels(nearest_resize(raw["instance_map"], th, tw), out["points"], held)
    out["meta"] = {**raw["meta"], "scale": raw["meta"].get("scale", 1.0) * sx}
    return out


def box_keys(raw: RawSample) -> list[str]:
    """Keys holding boxes: `boxes`, per-point sets `*_boxes` and `ignore_boxes`."""
    return [k for k in raw if (k == "boxes" or k.endswith("_boxes")) and raw[k] is not None]


def to_sample(raw: RawSample) -> dict:
    """The contract sample (datamodules/types.py) of a raw sample: image (3, H, W) float in [0, 1]."""
    image = np.asarray(raw["image"])
    if image.ndim == 2:
        image = image[..., None]
    tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1).contiguous()
    sample = {"image": tensor, "points": torch.from_numpy(np.require(raw["points"], np.float32, ["C", "W"])).reshape(-1, 2)}
    for key in box_keys(raw):
        sample[key] = torch.from_numpy(np.require(raw[key], np.float32, ["C", "W"])).reshape(-1, 4)
    if "boxes" not in sample:
        sample["boxes"] = None
    im = raw.get("instance_map")
    sample["instance_map"] = None if im is None else torch.from_numpy(np.asarray(im).astype(np.int64))
    if raw.get("point_attrs"):
        sample["point_attrs"] = {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in raw["point_attrs"].items()}
    for key, value in raw.items():
        if value is not None and key not in sample and key not in ("meta", "point_attrs", "image", "instance_map"):
            sample[key] = torch.from_numpy(np.require(value, requirements=["C", "W"])) if isinstance(value, np.ndarray) else value
    sample["meta"] = dict(raw["meta"])
    return sample
