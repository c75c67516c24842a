"""Instance-id maps on disk: 16-bit PNG (written by `crowdseg masks`) and XMask's `.npy`.

An id map is (H, W) integer: 0 background, k the instance of point k - 1 (datamodules/types.py).
PNG maps are named after the image (`mask_stem`: `<image stem>.png`) and written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from crowdseg.errors import DataError
from crowdseg.io import atomic_path

MAX_PNG_ID = 65535


def write_id_map_png(path: str | os.PathLike, id_map: np.ndarray) -> None:
    """Write an (H, W) id map as a 16-bit single-channel PNG, atomically."""
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"an id map is (H, W), got shape {id_map.shape}")
    if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_PNG_ID):
        raise DataError(f"{path}: ids must lie in 0..{MAX_PNG_ID} for a 16-bit PNG, got {id_map.min()}..{id_map.max()}")
    ok, buf = cv2.imencode(".png", id_map.astype(np.uint16))
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buf.tobytes())


def read_id_map(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int64 id map from a 16-bit (or 8-bit) PNG or an integer `.npy` file."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: instance map not found") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable .npy instance map ({exc})") from None
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise DataError(f"{path}: an instance map must be (H, W), got shape {arr.shape}")
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise DataError(f"{path}: an instance map must hold integer ids")
        elif arr.dtype.kind not in "iub":
            raise DataError(f"{path}: an instance map must hold integer ids, got dtype {arr.dtype}")
    else:
        if not path.exists():
            raise DataError(f"{path}: instance map not found")
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise DataError(f"{path}: unreadable PNG instance map")
        if arr.ndim != 2:
            raise DataError(f"{path}: an instance map PNG must have one channel, got shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{path}: negative instance id {int(arr.min())}")
    return arr.astype(np.int64)


def id_map_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an id map from its header only."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            shape = np.squeeze(np.load(path, mmap_mode="r")).shape
            if len(shape) != 2:
                raise DataError(f"{path}: an instance map must be (H, W), got shape {shape}")
            return int(shape[0]), int(shape[1])
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise DataError(f"{path}: instance map not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable instance map ({exc})") from None


def mask_stem(image_name: str) -> str:
    """The id-map file stem of an image: its name without the suffix, folders joined by "__".

    Names carry a folder only where ids repeat across folders (JHU's "train+val": "val/0003.jpg"
    -> "val__0003"), so those images still get one mask file each.
    """
    return "__".join(Path(str(image_name)).with_suffix("").parts)


def find_id_map(masks_dir: Path, stem: str) -> Path | None:
    for suffix in (".png", ".npy"):
        p = masks_dir / f"{stem}{suffix}"
        if p.exists():
            return p
    return None
