"""Reading and writing the NWPU-Crowd localization text format.

One line per image, numbers separated by white space:
- ground truth: `image_id num  x y sigma_s sigma_l level  x y sigma_s sigma_l level ...`
- predictions:  `image_id num  x y  x y ...`

Coordinates may be integers (the official files) or decimals. Blank lines are ignored. Any
malformed line raises `DataError` naming the file and the line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from crowdseg.errors import DataError
from crowdseg.io import write_text_atomic
from crowdseg.metrics._arrays import as_points


@dataclass(frozen=True)
class GroundTruthImage:
    """The heads of one image: points (N, 2) xy, radii (N, 2) [sigma_s, sigma_l], levels (N,) int."""
    points: np.ndarray
    radii: np.ndarray
    levels: np.ndarray

    @property
    def count(self) -> int:
        return int(self.points.shape[0])


def _parse_lines(path: str | os.PathLike, per_head: int, kind: str) -> dict[int, np.ndarray]:
    """{image_id: (num, per_head) float64} from a localization file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {kind} file ({exc})") from None
    records: dict[int, np.ndarray] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{lineno}"
        if len(tokens) < 2:
            raise DataError(f"{where}: expected `image_id num ...`, got {line.strip()!r}")
        try:
            image_id, num = int(tokens[0]), int(tokens[1])
        except ValueError:
            raise DataError(f"{where}: image id and count must be integers, got "
                            f"{tokens[0]!r} {tokens[1]!r}") from None
        if num < 0:
            raise DataError(f"{where}: negative count {num} for image {image_id}")
        if len(tokens) - 2 != per_head * num:
            raise DataError(f"{where}: image {image_id} declares {num} heads, so expects "
                            f"{per_head * num} numbers after the count, found {len(tokens) - 2} "
                            f"({per_head} per head in a {kind} file)")
        try:
            values = np.array(tokens[2:], dtype=np.float64).reshape(num, per_head)
        except ValueError:
            bad = next(t for t in tokens[2:] if not _is_number(t))
            raise DataError(f"{where}: not a number: {bad!r}") from None
        if not np.isfinite(values).all():
            raise DataError(f"{where}: non-finite value for image {image_id}")
        if image_id in records:
            raise DataError(f"{where}: image {image_id} appears twice")
        records[image_id] = values
    return records


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_gt_file(path: str | os.PathLike) -> dict[int, GroundTruthImage]:
    """Read an NWPU localization ground-truth file: {image_id: GroundTruthImage}, file order."""
    out: dict[int, GroundTruthImage] = {}
    for image_id, values in _parse_lines(path, 5, "ground-truth").items():
        levels = values[:, 4]
        if not np.array_equal(levels, np.round(levels)):
            raise DataError(f"{path}: image {image_id}: head levels must be integers")
        if (values[:, 2:4] < 0).any():
            raise DataError(f"{path}: image {image_id}: negative sigma")
        out[image_id] = GroundTruthImage(points=values[:, 0:2].copy(), radii=values[:, 2:4].copy(),
                                         levels=levels.astype(np.int64))
    return out


def read_pred_file(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """Read an NWPU localization prediction file: {image_id: (N, 2) float64 xy}, file order."""
    return {image_id: values.copy() for image_id, values in _parse_lines(path, 2, "prediction").items()}


def format_pred_line(image_id: int, points: Any, decimals: int = 0) -> str:
    """One prediction line; `decimals=0` writes rounded integers as the official evaluator expects."""
    pts = as_points(points)
    coords = np.round(pts, decimals).reshape(-1)
    text = " ".join(str(int(v)) if decimals == 0 else f"{v:.{decimals}f}" for v in coords)
    return f"{int(image_id)} {pts.shape[0]}" + (f" {text}" if text else "")


def write_pred_file(path: str | os.PathLike, predictions: Mapping[int, Any], decimals: int = 0) -> None:
    """Write {image_id: (N, 2) xy} as an NWPU prediction file (atomically, ids in the given order)."""
    lines = [format_pred_line(i, p, decimals) for i, p in predictions.items()]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
