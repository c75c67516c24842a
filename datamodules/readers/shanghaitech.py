"""ShanghaiTech part A / B: `<root>/<split>_data/images/IMG_k.jpg` + `ground-truth/GT_IMG_k.mat`.

`loadmat(f)["image_info"]` is MATLAB's `image_info{1}.location` (N, 2) x y, 1-based. Some mirrors
spell the folder `ground_truth`. Official sizes: A 300 train / 182 test, B 400 / 316.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import (Problem, Record, as_points, first_existing, from_matlab, list_images,
                                        load_mat, pair_files, point_records, split_folder)


def read_shanghaitech_mat(path: Path) -> np.ndarray:
    """(N, 2) float32 0-based points of a GT_IMG_k.mat file."""
    mat = load_mat(path)
    if "image_info" not in mat:
        raise DataError(f"{path}: key 'image_info' missing (found {sorted(k for k in mat if not k.startswith('__'))})")
    try:
        info = mat["image_info"][0, 0]
        struct = info[0, 0] if info.dtype == object else info
        location = struct["location"][0, 0] if struct.dtype.names and "location" in struct.dtype.names else struct[0][0]
    except (IndexError, KeyError, TypeError, ValueError):
        raise DataError(f"{path}: key 'image_info' has no 'location' field") from None
    return from_matlab(as_points(location, f"{path}: key 'image_info.location'"))


def read_shanghaitech(root: str | Path, split: str = "train") -> tuple[list[Record], list[Problem]]:
    folder = split_folder(Path(root), split)
    images = list_images(first_existing([folder / "images"], "images folder"))
    gt_dir = first_existing([folder / "ground-truth", folder / "ground_truth"], "ground-truth folder")
    problems: list[Problem] = []
    pairs = pair_files(images, {p.name: gt_dir / f"GT_{p.stem}.mat" for p in images},
                       sorted(gt_dir.glob("*.mat")), problems, "annotation file")
    return point_records(pairs, read_shanghaitech_mat, problems), problems
