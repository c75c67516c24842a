"""cclabeler-style folders: `<root>/images/<name>.jpg` + `<root>/jsons/<name>.json`.

JSON: `{"img_id": "<name>.jpg", "human_num": N, "points": [{"x": .., "y": ..}, ...], "boxes": [...]}`
(NWPU's `[x, y]` pairs are accepted too). Split "all" reads `<root>`; any other split reads
`<root>/<split>` when it exists.
"""
from __future__ import annotations

from pathlib import Path

from datamodules.readers.common import Problem, Record, list_images, pair_files, require_dir
from datamodules.readers.nwpu import points_json_record


def read_cclabeler(root: str | Path, split: str = "all") -> tuple[list[Record], list[Problem]]:
    folder = Path(root) if split == "all" else Path(root) / split
    images = list_images(require_dir(folder / "images", "images"))
    json_dir = require_dir(folder / "jsons", "jsons")
    problems: list[Problem] = []
    pairs = pair_files(images, {p.name: json_dir / f"{p.stem}.json" for p in images}, sorted(json_dir.glob("*.json")),
                       problems, "annotation file")
    records = []
    for img, ann in pairs:
        record = points_json_record(img, ann, problems)
        if record is not None:
            records.append(record)
    return records, problems
