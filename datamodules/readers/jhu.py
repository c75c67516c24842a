"""JHU-CROWD++: `<root>/<split>/images/XXXX.jpg`, `<split>/gt/XXXX.txt`, `<split>/image_labels.txt`.

GT lines: `x y w h o b`: head centre (x, y), head box size (w, h), occlusion o (1 visible,
2 partial, 3 full) and blur b (0/1). Head boxes are centred on the point. `image_labels.txt` lines:
`name,count,scene_type,weather,distractor_flag`. Splits: train (2,272), val (500), test (1,600);
"train+val" joins splits (names then carry the split: "val/0003.jpg", since ids repeat across splits).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import (Problem, Record, check_count, list_images, pair_files, parse_or_problem,
                                        require_dir)


def read_jhu_gt(path: Path) -> dict[str, np.ndarray]:
    """points (N, 2), head_boxes (N, 4) xyxy, occlusion (N,) int, blur (N,) int from a gt/*.txt file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        tokens = line.replace(",", " ").split()
        if not tokens:
            continue
        if len(tokens) != 6:
            raise DataError(f"{path}:{lineno}: expected 6 numbers `x y w h o b`, got {len(tokens)}: {line.strip()!r}")
        try:
            rows.append([float(t) for t in tokens])
        except ValueError:
            raise DataError(f"{path}:{lineno}: not a number in {line.strip()!r}") from None
    arr = np.asarray(rows, np.float64).reshape(-1, 6)
    x, y, w, h = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
    return {
        "points": np.stack([x, y], 1).astype(np.float32),
        "head_boxes": np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1).astype(np.float32),
        "occlusion": arr[:, 4].astype(np.int64),
        "blur": arr[:, 5].astype(np.int64),
    }


def read_image_labels(path: Path) -> dict[str, dict]:
    """{image stem: {count, scene_type, weather, distractor}} from `image_labels.txt`."""
    labels = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            raise DataError(f"{path}:{lineno}: expected `name,count,scene_type,weather,distractor_flag`, got {line.strip()!r}")
        try:
            labels[Path(parts[0]).stem] = {"count": int(parts[1]), "scene_type": parts[2],
                                           "weather": int(parts[3]), "distractor": int(parts[4])}
        except ValueError:
            raise DataError(f"{path}:{lineno}: count, weather and distractor_flag must be integers: {line.strip()!r}") from None
    return labels


def _read_split(root: Path, split: str, prefix: str) -> tuple[list[Record], list[Problem]]:
    folder = require_dir(root / split, f"JHU-CROWD++ split {split!r}")
    images = list_images(require_dir(folder / "images", "images"))
    gt_dir = require_dir(folder / "gt", "gt")
    problems: list[Problem] = []
    labels_path = folder / "image_labels.txt"
    labels = read_image_labels(labels_path) if labels_path.exists() else {}
    pairs = pair_files(images, {p.name: gt_dir / f"{p.stem}.txt" for p in images}, sorted(gt_dir.glob("*.txt")),
                       problems, "annotation file")
    records = []
    for img, ann in pairs:
        name = prefix + img.name
        gt = parse_or_problem(problems, name, read_jhu_gt, ann)
        if gt is None:
            continue
        image_labels = labels.get(img.stem, {})
        if "count" in image_labels:
            p = check_count(image_labels["count"], gt["points"], labels_path, f"{img.stem}.count")
            if p is not None:
                p.record = name
                problems.append(p)
                continue
        records.append(Record(name, img, gt["points"], ann_path=ann, point_boxes={"head_boxes": gt["head_boxes"]},
                              point_attrs={"occlusion": gt["occlusion"], "blur": gt["blur"]}, labels=image_labels))
    return records, problems


def read_jhu(root: str | Path, split: str = "train") -> tuple[list[Record], list[Problem]]:
    splits = split.split("+")
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad:
        raise DataError(f"JHU-CROWD++: unknown split {bad[0]!r}; use train, val, test or a join like 'train+val'")
    records, problems = [], []
    for s in splits:
        r, p = _read_split(Path(root), s, f"{s}/" if len(splits) > 1 else "")
        records += r
        problems += p
    return records, problems
