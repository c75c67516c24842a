"""XMask's processed layout (`JoyceeH0127/ECCV2026XMask`, METHODS.md A2.7):

    <root>/<split>_data/images/<id>.jpg
    <root>/<split>_data/new-anno/{GT_<id>.npy | <id>_ann.npy | <id>.npy}   (N, >=2) x y
    <root>/<split>_data/masks/<id>.npy                                       (H, W) instance ids

The point files keep the first two columns. Their coordinate origin is not documented: they
are taken as 0-based unless `one_based=True` (then 1 is subtracted, as for MATLAB files).
Masks are optional per image (XMask reads an empty mask when one is missing).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import Problem, Record, as_points, from_matlab, list_images, require_dir, split_folder

ANNO_PATTERNS = ("GT_{}.npy", "{}_ann.npy", "{}.npy")


def read_points_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npy point file ({exc})") from None
    if arr.ndim == 1 and arr.size % 2 == 0:
        arr = arr.reshape(-1, 2)
    return as_points(arr, str(path))


def read_xmask(root: str | Path, split: str = "train", one_based: bool = False) -> tuple[list[Record], list[Problem]]:
    folder = split_folder(Path(root), split)
    images = list_images(require_dir(folder / "images", "images"))
    anno_dir = require_dir(folder / "new-anno", "new-anno")
    masks_dir = folder / "masks"
    problems: list[Problem] = []
    records = []
    used = set()
    for img in images:
        ann = next((anno_dir / p.format(img.stem) for p in ANNO_PATTERNS if (anno_dir / p.format(img.stem)).exists()), None)
        if ann is None:
            problems.append(Problem(str(img), f"image without point file in {anno_dir} "
                                              f"(tried {', '.join(p.format(img.stem) for p in ANNO_PATTERNS)})",
                                    record=img.name))
            continue
        used.add(ann.name)
        try:
            points = read_points_npy(ann)
        except DataError as exc:
            problems.append(Problem(str(ann), str(exc).partition(": ")[2], record=img.name))
            continue
        mask = masks_dir / f"{img.stem}.npy"
        records.append(Record(img.name, img, from_matlab(points) if one_based else points, ann_path=ann,
                              mask_path=mask if mask.exists() else None))
    for ann in sorted(anno_dir.glob("*.npy")):
        if ann.name not in used:
            problems.append(Problem(str(ann), "point file without a matching image"))
    return records, problems
