"""A plain folder of images without annotations (`crowdseg predict --images DIR`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crowdseg.errors import DataError
from datamodules.readers.common import Problem, Record, list_images


def read_folder(root: str | Path, split: str = "all") -> tuple[list[Record], list[Problem]]:
    """Every image directly in `root` (natural order), with no points; `split` is ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    images = list_images(root)
    if not images:
        raise DataError(f"{root}: no images (.jpg, .png, ...) in this folder")
    return [Record(name=p.name, image_path=p, points=np.zeros((0, 2), np.float32)) for p in images], []
