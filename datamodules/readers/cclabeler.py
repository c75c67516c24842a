"""cclabeler-style folders: `<root>/images/<name>.jpg` + `<root>/jsons/<name>.json`.

JSON: `{"img_id": "<name>.jpg", "human_num": N, "points": [{"x": .., "y": ..}, ...], "boxes": [...]}`
(NWPU's `[x, y]` pairs are accepted too). Split "all" reads `<root>`; any other split reads
`<root>/<split>` when it exists.
"""
from __future__ import annotations

from pathlib import Path

from crowdseg.errors import DataError
from datamodules.readers.common import Problem, Record, check_count, list_images, pair_files, require_dir
from datamodules.readers.nwpu import read_points_json


def read_cclabeler(root: str | Path, split: str = "all") -> tuple[list[Record], list[Problem]]:
    folder = Path(root) if split == "all" else Path(root) / split
    images = list_images(require_dir(folder / "images", "images"))
    json_dir = require_dir(folder / "jsons", "jsons")
    problems: list[Problem] = []
    pairs = pair_files(images, {p.name: json_dir / f"{p.stem}.json" for p in images}, sorted(json_dir.glob("*.json")),
                       problems, "annotation file")
    records = []
    for img, ann in pairs:
        try:
            gt = read_points_json(ann)
        except DataError as exc:
            problems.append(Problem(str(ann), str(exc).partition(": ")[2], record=img.name))
            continue
        if gt["human_num"] is not None:
            p = check_count(gt["human_num"], gt["points"], ann, "human_num")
            if p is not None:
                p.record = img.name
                problems.append(p)
                continue
        records.append(Record(img.name, img, gt["points"], gt["boxes"], ann_path=ann))
    return records, problems
