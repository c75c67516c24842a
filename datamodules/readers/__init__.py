"""Dataset readers: each turns a dataset's original files into `Record`s (datamodules/readers/common.py).

Every reader is a plain function `reader(root, split, **options) -> (records, problems)`; `READERS`
maps a dataset name to it. Problems (missing pairs, unparsable files) are returned, not raised, so
`datamodules.dataset.build_dataset` can fail or skip according to `on_bad_annotation`.

Coordinate conventions (the one place they are written down)
------------------------------------------------------------
Points and boxes are in 0-based *pixel-index* coordinates (datamodules/types.py): the centre of the
top-left pixel is (0, 0) and the image spans [-0.5, W - 0.5] x [-0.5, H - 0.5].

- MATLAB `.mat` files are 1-based (the centre of the top-left pixel is (1, 1)): ShanghaiTech
  `image_info`, UCF-QNRF and UCF-CC-50 `annPoints`. Readers subtract exactly 1 from x and y
  (`common.from_matlab`), and from nothing else.
- Text, JSON, ODGT and COCO files (JHU-CROWD++, NWPU-Crowd JSON, cclabeler, CrowdHuman, CIS) are
  written by tools with a 0-based origin and are used as they are. Whether a tool meant the pixel
  centre or its corner (a 0.5 px difference) is not recorded anywhere and is below annotation
  precision; no half-pixel shift is applied.
- XMask `.npy` point files are taken as 0-based (`one_based=True` treats them as MATLAB values).
- Boxes are xyxy in the same frame as points and are transformed like their corner points.

Validation (datamodules/validation.py) accepts points up to `outside_tolerance` pixels outside the
image extent and clips them onto the border pixels; points farther out are annotation errors.
"""
from __future__ import annotations

from typing import Callable

from datamodules.readers.cclabeler import read_cclabeler
from datamodules.readers.coco import read_coco
from datamodules.readers.common import Problem, Record
from datamodules.readers.crowdhuman import read_crowdhuman
from datamodules.readers.folder import read_folder
from datamodules.readers.jhu import read_jhu
from datamodules.readers.nwpu import read_nwpu
from datamodules.readers.shanghaitech import read_shanghaitech
from datamodules.readers.ucf import read_qnrf, read_ucf_cc_50
from datamodules.readers.union import read_union
from datamodules.readers.xmask import read_xmask
from datamodules.readers.yolo import read_yolo_seg

Reader = Callable[..., "tuple[list[Record], list[Problem]]"]

READERS: dict[str, Reader] = {
    "sha": read_shanghaitech,
    "shb": read_shanghaitech,
    "qnrf": read_qnrf,
    "ucf_cc_50": read_ucf_cc_50,
    "jhu": read_jhu,
    "nwpu": read_nwpu,
    "cclabeler": read_cclabeler,
    "crowdhuman": read_crowdhuman,
    "cis": read_coco,
    "coco": read_coco,
    "xmask": read_xmask,
    "folder": read_folder,
    "yolo_seg": read_yolo_seg,
}


def read_sources(root, split: str, sources: list[dict]) -> "tuple[list[Record], list[Problem]]":
    """Several datasets as one (`data.name: union`, `data.sources`; datamodules/readers/union.py)."""
    return read_union(root, split, sources, READERS)


READERS["union"] = read_sources

__all__ = ["READERS", "Record", "Problem"]
