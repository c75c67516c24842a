"""YOLO segmentation labels (Ultralytics' coco128-seg layout): polygons in fractions of the image size.

Layout: `<root>/images/<split>/*.jpg` and `<root>/labels/<split>/<stem>.txt` (`split` "all" or "" uses
`<root>/images` and `<root>/labels` directly). One line per object: `class x1 y1 x2 y2 ...`, the
polygon's vertices as fractions of the image width and height.

- Only the classes in `class_ids` are read (default [0], person in COCO's YOLO numbering).
- An image without a label file has no people (YOLO's convention); a label file without an image is
  reported as a problem (no record is made).
- A vertex outside [0, 1] is clipped onto the image border; a polygon with no area left (fewer than
  three distinct vertices, or wholly outside the image) and a line that does not parse are problems
  naming the file and the line.
- Instances, points and boxes as in the COCO reader: the id map paints larger instances first, the
  point of an instance is an interior pixel of its visible region, the box is the polygon's extent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from crowdseg.errors import DataError
from datamodules.readers.coco import instances_and_points
from datamodules.readers.common import Problem, Record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_polygon_line(line: str, width: int, height: int) -> tuple[int, list[float]]:
    """(class, flat pixel polygon [x1, y1, x2, y2, ...]) of one label line; ValueError says what is wrong."""
    fields = line.split()
    try:
        cls = int(fields[0])
        values = np.array([float(v) for v in fields[1:]], np.float64)
    except (ValueError, IndexError):
        raise ValueError("expected 'class x1 y1 x2 y2 ...' with numbers") from None
    if len(values) < 6 or len(values) % 2:
        raise ValueError(f"a polygon needs an even number of at least 6 coordinates, got {len(values)}")
    xy = np.clip(values.reshape(-1, 2), 0.0, 1.0) * [width, height]
    x, y = xy[:, 0], xy[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    if len(np.unique(xy, axis=0)) < 3 or area <= 0:
        raise ValueError("the polygon has no area inside the image")
    return cls, xy.reshape(-1).tolist()


def _folders(root: Path, split: str) -> tuple[Path, Path]:
    sub = "" if split in ("", "all") else split
    images, labels = root / "images" / sub, root / "labels" / sub
    if not images.is_dir():
        raise DataError(f"{images}: image folder of the YOLO dataset not found (expected <root>/images/<split>)")
    return images, labels


def read_yolo_seg(root: str | Path, split: str = "all", class_ids: list[int] | None = None
                  ) -> tuple[list[Record], list[Problem]]:
    """Records of a YOLO segmentation dataset (see the module docstring)."""
    images_dir, labels_dir = _folders(Path(root), split)
    wanted = {0} if class_ids is None else {int(c) for c in class_ids}
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.stem for p in images}
    problems = [Problem(str(label), "label file without an image (left out)")
                for label in sorted(labels_dir.glob("*.txt")) if label.stem not in stems] if labels_dir.is_dir() else []
    records = []
    for image in images:
        label = labels_dir / f"{image.stem}.txt"
        try:
            with Image.open(image) as im:
                width, height = im.size
        except OSError as exc:
            problems.append(Problem(str(image), f"unreadable image ({exc})", record=image.name))
            continue
        polygons, bad = [], False
        if label.exists():
            for number, line in enumerate(label.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    cls, polygon = parse_polygon_line(line, width, height)
                except ValueError as exc:
                    problems.append(Problem(f"{label}:{number}", str(exc), record=image.name))
                    bad = True
                    continue
                if cls in wanted:
                    polygons.append([polygon])
        if bad:
            continue
        boxes = np.array([[min(p[0][0::2]), min(p[0][1::2]), max(p[0][0::2]), max(p[0][1::2])] for p in polygons],
                         np.float32).reshape(-1, 4)
        _, points = instances_and_points(polygons, boxes, height, width)
        records.append(Record(image.name, image, points, boxes, ann_path=label if label.exists() else None,
                              size=(height, width), polygons=polygons,
                              ignore_boxes=np.zeros((0, 4), np.float32)))
    return records, problems
