"""NWPU-Crowd: `images_part{1..5}/XXXX.jpg` (or `images/`), `jsons/XXXX.json`, `{train,val,test}.txt`.

JSON: `{"img_id": "XXXX.jpg", "human_num": N, "points": [[x, y], ...], "boxes": [[x0, y0, x1, y1], ...]}`.
The split files list one image per line, the id first. Test labels are withheld: test records
are unlabeled (`labeled=False`, no points). Official numbering: ids 0001..5109, test = 3610..5109,
val = the 500 ids of the official localization file, train = the other 3,109 ids below 3610
(`datamodules/splits/nwpu/train.txt`).

The localization text format (`val_gt_loc.txt`) is read by `crowdseg.metrics.nwpu`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import (Problem, Record, check_count, json_boxes, json_points, read_json,
                                        require_dir)


def read_points_json(path: Path) -> dict:
    """points (N, 2), optional boxes (N, 4) and the declared count from an NWPU / cclabeler JSON file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with key 'points'")
    if "points" not in data:
        raise DataError(f"{path}: key 'points' missing")
    points = json_points(data["points"], path)
    boxes = json_boxes(data.get("boxes") or [], path)
    if len(boxes) and len(boxes) != len(points):
        raise DataError(f"{path}: key 'boxes' has {len(boxes)} boxes for {len(points)} points")
    return {"points": points, "boxes": boxes if len(boxes) else None, "human_num": data.get("human_num")}


def points_json_record(img: Path, ann: Path, problems: list[Problem]) -> Record | None:
    """The record of image `img` from its points JSON `ann`, or None with the reason added to `problems`
    (unreadable file, or a declared `human_num` that differs from the number of points)."""
    try:
        gt = read_points_json(ann)
    except DataError as exc:
        problems.append(Problem(str(ann), str(exc).partition(": ")[2], record=img.name))
        return None
    if gt["human_num"] is not None:
        problem = check_count(gt["human_num"], gt["points"], ann, "human_num")
        if problem is not None:
            problem.record = img.name
            problems.append(problem)
            return None
    return Record(img.name, img, gt["points"], gt["boxes"], ann_path=ann)


def read_split_ids(path: Path) -> list[str]:
    """The ids (first token of each line) of an NWPU split file."""
    if not path.exists():
        raise DataError(f"{path}: split file not found")
    ids = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if tokens:
            ids.append(Path(tokens[0]).stem)
    return ids


def _image_index(root: Path) -> dict[str, Path]:
    folders = sorted(root.glob("images_part*")) + ([root / "images"] if (root / "images").is_dir() else [])
    index = {}
    for folder in folders:
        for p in folder.iterdir():
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                index[p.stem] = p
    return index


def read_nwpu(root: str | Path, split: str = "train") -> tuple[list[Record], list[Problem]]:
    root = require_dir(Path(root), "NWPU-Crowd")
    if split not in ("train", "val", "test"):
        raise DataError(f"NWPU-Crowd: unknown split {split!r}; use train, val or test")
    ids = read_split_ids(root / f"{split}.txt")
    images = _image_index(root)
    json_dir = root / "jsons"
    problems: list[Problem] = []
    records = []
    for i in ids:
        img = images.get(i)
        ann = json_dir / f"{i}.json"
        if img is None:
            problems.append(Problem(str(ann if ann.exists() else root / f"{split}.txt"),
                                    f"image {i} is listed in {split}.txt but no image file was found"))
            continue
        if split == "test" and not ann.exists():
            records.append(Record(img.name, img, np.zeros((0, 2), np.float32), labeled=False))
            continue
        if not ann.exists():
            problems.append(Problem(str(img), f"image without annotation file (expected {ann})", record=img.name))
            continue
        record = points_json_record(img, ann, problems)
        if record is not None:
            records.append(record)
    return records, problems
