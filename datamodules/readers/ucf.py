"""UCF-QNRF and UCF-CC-50: `<name>.jpg` + `<name>_ann.mat` with `annPoints` (N, 2) x y, 1-based.

UCF-QNRF: `<root>/{Train,Test}/img_XXXX.jpg` (1,201 train / 334 test).
UCF-CC-50: 50 images `<root>/N.jpg` (N = 1..50), no official split: the usual protocol is 5-fold
cross-validation over consecutive images, so splits are "all", "fold<k>_train" and "fold<k>_test"
(k = 1..5; fold k tests images 10k-9 .. 10k).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import (Problem, Record, as_points, from_matlab, list_images, load_mat,
                                        pair_files, point_records, require_dir, split_folder)


def read_ann_points_mat(path: Path) -> np.ndarray:
    """(N, 2) float32 0-based points of a UCF `*_ann.mat` file (key `annPoints`)."""
    mat = load_mat(path)
    if "annPoints" not in mat:
        raise DataError(f"{path}: key 'annPoints' missing (found {sorted(k for k in mat if not k.startswith('__'))})")
    return from_matlab(as_points(mat["annPoints"], f"{path}: key 'annPoints'"))


def _read_ann_folder(folder: Path, keep=lambda p: True) -> tuple[list[Record], list[Problem]]:
    images = [p for p in list_images(folder) if keep(p)]
    problems: list[Problem] = []
    anns = [p for p in sorted(folder.glob("*_ann.mat")) if keep(p.with_name(p.name[:-len("_ann.mat")] + ".jpg"))]
    pairs = pair_files(images, {p.name: p.with_name(f"{p.stem}_ann.mat") for p in images}, anns, problems,
                       "annotation file")
    return point_records(pairs, read_ann_points_mat, problems), problems


def read_qnrf(root: str | Path, split: str = "train") -> tuple[list[Record], list[Problem]]:
    folder = split_folder(Path(root), split, {"train": ["Train"], "test": ["Test"]})
    return _read_ann_folder(folder)


def ucf_cc_50_fold(split: str) -> tuple[int, bool] | None:
    """(fold, is_test) of a split name like "fold3_test"; None for "all"."""
    if split == "all":
        return None
    m = re.fullmatch(r"fold([1-5])_(train|test)", split)
    if not m:
        raise DataError(f"UCF-CC-50: unknown split {split!r}; use 'all', 'fold<k>_train' or 'fold<k>_test' (k = 1..5)")
    return int(m.group(1)), m.group(2) == "test"


def read_ucf_cc_50(root: str | Path, split: str = "all") -> tuple[list[Record], list[Problem]]:
    folder = require_dir(Path(root), "UCF-CC-50")
    fold = ucf_cc_50_fold(split)

    def keep(p: Path) -> bool:
        if fold is None:
            return True
        if not p.stem.isdigit():
            return False
        in_fold = (int(p.stem) - 1) // 10 + 1 == fold[0]
        return in_fold == fold[1]

    return _read_ann_folder(folder, keep)
