"""CrowdHuman `.odgt` (JSON lines): `<root>/annotation_<split>.odgt` + `<root>/Images/<ID>.jpg`.

Each line: `{"ID": "273271,c9db000d5146c15", "gtboxes": [{"tag": "person" | "mask", "fbox", "vbox",
"hbox": [x, y, w, h], "head_attr": {"ignore", "occ", "unsure"}, "extra": {"ignore", "occ", ...}}]}`.
A `mask` tag and a person with `extra.ignore = 1` become ignore regions (`ignore_boxes`, their
full box). Every other person is an instance: `boxes` is the box chosen by `box_type`
(full | visible | head), `full_boxes`, `visible_boxes`, `head_boxes` keep all three (full boxes may
extend beyond the image), and the point is the centre of the head box's part inside the image
(of the visible box when the head is outside).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import Problem, Record, first_existing, image_size, require_dir

BOX_KEYS = {"full": "fbox", "visible": "vbox", "head": "hbox"}


def read_odgt(path: Path) -> list[dict]:
    """The JSON objects of an `.odgt` file, one per non-empty line."""
    if not path.exists():
        raise DataError(f"{path}: annotation file not found")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(entry, dict) or "ID" not in entry or not isinstance(entry.get("gtboxes", []), list):
            raise DataError(f"{path}:{lineno}: expected an object with 'ID' and a list 'gtboxes'")
        entry["_line"] = lineno
        entries.append(entry)
    return entries


def _xyxy(box, where: str) -> np.ndarray:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a box [x, y, w, h], got {box!r}") from None
    return np.array([x, y, x + w, y + h], np.float32)


def _centre_inside(box: np.ndarray, h: int, w: int) -> np.ndarray | None:
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[2], w - 1.0), min(box[3], h - 1.0)
    if x1 < x0 or y1 < y0:
        return None
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2], np.float32)


def entry_to_record(entry: dict, path: Path, image: Path, size: tuple[int, int], box_type: str) -> Record:
    h, w = size
    where = f"{path}:{entry['_line']}"
    persons, ignore = [], []
    for k, gt in enumerate(entry.get("gtboxes", [])):
        key = f"{where}: gtboxes[{k}]"
        if not isinstance(gt, dict) or "fbox" not in gt:
            raise DataError(f"{key}: a gtbox needs 'tag' and 'fbox'")
        full = _xyxy(gt["fbox"], f"{key}.fbox")
        if gt.get("tag") != "person" or (gt.get("extra") or {}).get("ignore", 0) == 1:
            ignore.append(full)
            continue
        visible = _xyxy(gt["vbox"], f"{key}.vbox") if "vbox" in gt else full
        head = _xyxy(gt["hbox"], f"{key}.hbox") if "hbox" in gt else None
        point = next((c for c in (_centre_inside(b, h, w) for b in (head, visible, full) if b is not None)
                      if c is not None), None)
        if point is None:  # a person entirely outside the image carries no point
            continue
        head_attr, extra = gt.get("head_attr") or {}, gt.get("extra") or {}
        persons.append((point, full, visible, head if head is not None else np.full(4, np.nan, np.float32),
                        [int(head_attr.get("ignore", 0)), int(head_attr.get("occ", 0)),
                         int(head_attr.get("unsure", 0)), int(extra.get("occ", 0))]))
    n = len(persons)
    stack = lambda i, width: np.stack([p[i] for p in persons]).astype(np.float32) if n else np.zeros((0, width), np.float32)
    points, full, visible, head = stack(0, 2), stack(1, 4), stack(2, 4), stack(3, 4)
    attrs = np.asarray([p[4] for p in persons], np.int64).reshape(n, 4)
    boxes = {"full": full, "visible": visible, "head": head}[box_type]
    return Record(image.name, image, points, boxes, ann_path=path, size=size,
                  point_boxes={"full_boxes": full, "visible_boxes": visible, "head_boxes": head},
                  point_attrs={"head_ignore": attrs[:, 0], "head_occ": attrs[:, 1], "head_unsure": attrs[:, 2],
                               "occ": attrs[:, 3]},
                  ignore_boxes=np.asarray(ignore, np.float32).reshape(-1, 4))


def read_crowdhuman(root: str | Path, split: str = "train", box_type: str = "full",
                    image_dir: str | Path | None = None) -> tuple[list[Record], list[Problem]]:
    if box_type not in BOX_KEYS:
        raise DataError(f"CrowdHuman: box_type must be one of {sorted(BOX_KEYS)}, got {box_type!r}")
    root = require_dir(Path(root), "CrowdHuman")
    path = first_existing([root / f"annotation_{split}.odgt", root / f"{split}.odgt"], f"annotation file of split {split!r}")
    images_dir = Path(image_dir) if image_dir else first_existing([root / "Images", root / "images"], "Images folder")
    problems: list[Problem] = []
    records = []
    for entry in read_odgt(path):
        image = images_dir / f"{entry['ID']}.jpg"
        if not image.exists():
            problems.append(Problem(f"{path}:{entry['_line']}", f"annotation of {image.name} without a matching image "
                                                                 f"in {images_dir}"))
            continue
        try:
            size = image_size(image)
            records.append(entry_to_record(entry, path, image, size, box_type))
        except DataError as exc:
            file, _, msg = str(exc).partition(": ")
            problems.append(Problem(file, msg, record=image.name))
    return records, problems
