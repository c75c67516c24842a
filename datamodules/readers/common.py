"""What every reader returns (`Record`, `Problem`) and the small helpers readers share.

Coordinate conventions are documented once, in `datamodules/readers/__init__.py`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from crowdseg.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class Record:
    """One annotated image, before decoding.

    points: (N, 2) float32, xy in 0-based pixel-index coordinates of the original image.
    boxes: (N, 4) float32 xyxy or None; row k belongs to point k.
    point_boxes: further per-point box sets, e.g. {"head_boxes": (N, 4)} (sample keys of the same name).
    point_attrs: per-point (N,) arrays, e.g. JHU occlusion level.
    ignore_boxes: (M, 4) regions to ignore in training (CrowdHuman `mask` tags, ignored persons).
    size: (H, W) when the annotation states it (COCO, JSON); otherwise read from the image header.
    mask_path: instance-id map on disk (16-bit PNG or .npy); polygons: COCO segmentations, one per
    point, rasterised on load. id_remap: (N_file + 1,) old id -> new id, set when validation dropped
    points, applied to the id map on load.
    labels: image-level labels (JHU scene type, weather, ...). labeled: False for images whose
    annotation is withheld (NWPU test).
    """

    name: str
    image_path: Path | None
    points: np.ndarray
    boxes: np.ndarray | None = None
    ann_path: Path | None = None
    size: tuple[int, int] | None = None
    mask_path: Path | None = None
    polygons: list | None = None
    point_boxes: dict[str, np.ndarray] = field(default_factory=dict)
    point_attrs: dict[str, np.ndarray] = field(default_factory=dict)
    ignore_boxes: np.ndarray | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    labeled: bool = True
    id_remap: np.ndarray | None = None

    @property
    def source(self) -> str:
        """The file to name in messages about this record's annotation."""
        return str(self.ann_path or self.image_path or self.name)

    def keep_points(self, keep: np.ndarray) -> None:
        """Keep only points `keep` (sorted int indices); ids of a mask are renumbered on load."""
        n = len(self.points)
        self.points = self.points[keep]
        if self.boxes is not None:
            self.boxes = self.boxes[keep]
        self.point_boxes = {k: v[keep] for k, v in self.point_boxes.items()}
        self.point_attrs = {k: v[keep] for k, v in self.point_attrs.items()}
        if self.polygons is not None:
            self.polygons = [self.polygons[i] for i in keep]
        remap = np.zeros(n + 1, np.int64)
        remap[np.asarray(keep) + 1] = np.arange(1, len(keep) + 1)
        self.id_remap = remap if self.id_remap is None else remap[self.id_remap]


@dataclass
class Problem:
    """A defect of one file. `record` names the image it concerns (None: no record was made);
    `point_indices` are the offending points when dropping them would fix it."""

    path: str
    message: str
    record: str | None = None
    point_indices: np.ndarray | None = None
    duplicate: bool = False  # exact repeats of another point (data.on_duplicate_points)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers: IMG_2 < IMG_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def first_existing(candidates: Iterable[Path], what: str) -> Path:
    candidates = list(candidates)
    for c in candidates:
        if c.exists():
            return c
    raise DataError(f"{candidates[0]}: {what} not found (also tried: {', '.join(str(c) for c in candidates[1:]) or 'nothing else'})")


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty image file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: empty image ({w}x{h} pixels)")
    return h, w


# The last bytes of a complete file: JPEG's end-of-image marker, PNG's IEND chunk.
END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}


def truncated(path: Path) -> bool:
    """True when a JPEG / PNG file lacks its end marker (a cut-off download): a cheap check of the
    last bytes, no decoding. Other formats are not checked."""
    marker = END_MARKERS.get(path.suffix.lower())
    if marker is None:
        return False
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        return marker not in f.read()


def as_points(values: Any, where: str) -> np.ndarray:
    """(N, 2) float32 from an array-like of rows with at least two numbers."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: points are not numbers") from None
    if arr.size == 0:
        return np.zeros((0, 2), np.float32)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr.reshape(1, 2)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(f"{where}: points must be an (N, 2) array of x y, got shape {arr.shape}")
    return arr[:, :2].astype(np.float32)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def json_points(obj: Any, path: Path, key: str = "points") -> np.ndarray:
    """Points from a JSON list of `[x, y]` pairs (NWPU) or `{"x": .., "y": ..}` objects (cclabeler)."""
    if not isinstance(obj, list):
        raise DataError(f"{path}: key '{key}' must be a list, got {type(obj).__name__}")
    rows = []
    for i, p in enumerate(obj):
        where = f"{path}: key '{key}[{i}]'"
        if isinstance(p, dict):
            if "x" not in p or "y" not in p:
                raise DataError(f"{where}: a point object needs 'x' and 'y', got keys {sorted(p)}")
            p = (p["x"], p["y"])
        if not isinstance(p, (list, tuple)) or len(p) < 2:
            raise DataError(f"{where}: expected [x, y] or {{'x', 'y'}}, got {p!r}")
        try:
            rows.append((float(p[0]), float(p[1])))
        except (TypeError, ValueError):
            raise DataError(f"{where}: not a number: {p!r}") from None
    return np.asarray(rows, np.float32).reshape(-1, 2)


def json_boxes(obj: Any, path: Path, key: str = "boxes") -> np.ndarray:
    """(M, 4) xyxy from a JSON list of `[x0, y0, x1, y1]` (NWPU) or objects with those corners."""
    if not isinstance(obj, list):
        raise DataError(f"{path}: key '{key}' must be a list, got {type(obj).__name__}")
    rows = []
    for i, b in enumerate(obj):
        if isinstance(b, dict):
            names = next((n for n in (("x0", "y0", "x1", "y1"), ("x_min", "y_min", "x_max", "y_max"),
                                      ("xmin", "ymin", "xmax", "ymax")) if all(k in b for k in n)), None)
            if names is None:
                raise DataError(f"{path}: key '{key}[{i}]': unsupported box object with keys {sorted(b)}")
            b = [b[k] for k in names]
        try:
            row = [float(v) for v in b]
        except (TypeError, ValueError):
            raise DataError(f"{path}: key '{key}[{i}]': not a box of 4 numbers: {b!r}") from None
        if len(row) != 4:
            raise DataError(f"{path}: key '{key}[{i}]': a box needs 4 numbers, got {len(row)}")
        rows.append(row)
    return np.asarray(rows, np.float32).reshape(-1, 4)


def check_count(declared: Any, points: np.ndarray, path: Path, key: str) -> Problem | None:
    """A Problem when an annotation's declared head count disagrees with its points."""
    try:
        declared_n = int(declared)
    except (TypeError, ValueError):
        return Problem(str(path), f"key '{key}' is not an integer: {declared!r}")
    if declared_n != len(points) or (isinstance(declared, float) and not math.isfinite(declared)):
        return Problem(str(path), f"key '{key}' says {declared_n} heads but the file has {len(points)} points")
    return None


def from_matlab(points: np.ndarray) -> np.ndarray:
    """MATLAB 1-based pixel coordinates -> 0-based pixel-index coordinates (see readers/__init__.py)."""
    return (points - 1.0).astype(np.float32)


def load_mat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... for broken files
        raise DataError(f"{path}: unreadable .mat file ({type(exc).__name__}: {exc})") from None


def split_folder(root: Path, split: str, names: dict[str, list[str]] | None = None) -> Path:
    """The folder of `split` under `root`: `<root>/<split>_data`, `<root>/<split>` or, for split
    "all", `root` itself. `names` maps a split to extra folder names to try (e.g. QNRF "Train")."""
    root = Path(root)
    if split == "all":
        return require_dir(root, "dataset")
    candidates = [root / n for n in (names or {}).get(split, [])] + [root / f"{split}_data", root / split]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(f"{root}: no folder for split {split!r} (tried {', '.join(c.name for c in candidates)}); "
                    f"use split 'all' for a flat folder")


def pair_files(images: list[Path], ann_for: dict[str, Path], ann_files: Iterable[Path],
               problems: list[Problem], what: str) -> list[tuple[Path, Path]]:
    """Match images with their annotation files; report images without one and the reverse.

    ann_for: image file name -> expected annotation path; ann_files: every annotation file found.
    """
    pairs = []
    for img in images:
        ann = ann_for[img.name]
        if ann.exists():
            pairs.append((img, ann))
        else:
            problems.append(Problem(str(img), f"image without annotation file (expected {ann})", record=img.name))
    expected = {p.resolve() for p in ann_for.values()}
    for ann in ann_files:
        if ann.resolve() not in expected:
            problems.append(Problem(str(ann), f"{what} without a matching image"))
    return pairs


def parse_or_problem(problems: list[Problem], name: str, fn, *args, **kwargs):
    """Run a parser; a DataError becomes a Problem for record `name` (None is returned)."""
    try:
        return fn(*args, **kwargs)
    except DataError as exc:
        msg = str(exc)
        path, _, rest = msg.partition(": ")
        problems.append(Problem(path if rest else name, rest or msg, record=name))
        return None


def point_records(pairs: Iterable[tuple[Path, Path]], read_points, problems: list[Problem]) -> list[Record]:
    """A Record per (image, annotation) pair whose points `read_points(annotation)` parses; a file
    it rejects becomes a Problem instead."""
    records = []
    for img, ann in pairs:
        points = parse_or_problem(problems, img.name, read_points, ann)
        if points is not None:
            records.append(Record(img.name, img, points, ann_path=ann))
    return records
