"""Small dataset folders in the original formats, written into a tmp dir by the data tests.

Real files for these formats are not in ../shared/data (JHU, NWPU JSON, QNRF, CrowdHuman, XMask,
16-bit PNG id maps); every value here is chosen so a test can state the expected result by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_image(path: Path, height: int, width: int, gray: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if gray else (height, width, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def disc_map(height: int, width: int, centres: list[tuple[float, float]], radius: int) -> np.ndarray:
    """(H, W) int32 id map with a disc of `radius` around each centre (id k + 1 for centre k)."""
    yy, xx = np.mgrid[0:height, 0:width]
    id_map = np.zeros((height, width), np.int32)
    for k, (x, y) in enumerate(centres):
        id_map[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = k + 1
    return id_map


def make_jhu(root: Path) -> Path:
    """train: 0001 (2 heads), 0002 (0 heads); val: 0001 (1 head)."""
    write_image(root / "train/images/0001.jpg", 40, 60)
    write_image(root / "train/images/0002.jpg", 30, 30, seed=1)
    (root / "train/gt").mkdir(parents=True)
    (root / "train/gt/0001.txt").write_text("10 12 4 6 1 0\n20 5 2 2 2 1\n")
    (root / "train/gt/0002.txt").write_text("")
    (root / "train/image_labels.txt").write_text("0001,2,street,0,0\n0002,0,marathon,1,1\n")
    write_image(root / "val/images/0001.jpg", 20, 20, seed=2)
    (root / "val/gt").mkdir(parents=True)
    (root / "val/gt/0001.txt").write_text("3 4 2 2 3 0\n")
    (root / "val/image_labels.txt").write_text("0001,1,stadium,2,0\n")
    return root


def make_nwpu(root: Path) -> Path:
    """train: 0001 (2 heads with boxes), 0002 (negative sample); val: 0003; test: 0004 (no json)."""
    write_image(root / "images_part1/0001.jpg", 32, 48)
    write_image(root / "images_part1/0002.jpg", 32, 32, seed=1)
    write_image(root / "images_part2/0003.jpg", 16, 16, seed=2)
    write_image(root / "images_part2/0004.jpg", 16, 16, seed=3)
    (root / "jsons").mkdir()
    (root / "jsons/0001.json").write_text(json.dumps({"img_id": "0001.jpg", "human_num": 2, "points": [[5, 6], [40.5, 20]],
                                                      "boxes": [[3, 4, 7, 8], [38, 18, 43, 22]]}))
    (root / "jsons/0002.json").write_text(json.dumps({"img_id": "0002.jpg", "human_num": 0, "points": [], "boxes": []}))
    (root / "jsons/0003.json").write_text(json.dumps({"img_id": "0003.jpg", "human_num": 1, "points": [[8, 8]], "boxes": []}))
    (root / "train.txt").write_text("0001 0 3\n0002 1 0\n")
    (root / "val.txt").write_text("0003 0 1\n")
    (root / "test.txt").write_text("0004 0 2\n")
    return root


def make_qnrf(root: Path) -> Path:
    """Train: img_0001 (annPoints 1-based (1,1) and (10,5)); Test: img_0002 (one point)."""
    write_image(root / "Train/img_0001.jpg", 20, 30)
    scipy.io.savemat(root / "Train/img_0001_ann.mat", {"annPoints": np.array([[1.0, 1.0], [10.0, 5.0]])})
    write_image(root / "Test/img_0002.jpg", 20, 20, seed=1)
    scipy.io.savemat(root / "Test/img_0002_ann.mat", {"annPoints": np.array([[5.5, 6.5]])})
    return root


def make_sha(root: Path, folder: str = "ground_truth") -> Path:
    """part_A-style train_data with two images; GT in MATLAB's nested image_info struct."""
    for k, pts in ((1, [[1.0, 1.0], [20.0, 10.0]]), (2, [[4.0, 3.0]])):
        write_image(root / f"train_data/images/IMG_{k}.jpg", 24, 32, seed=k)
        info = np.empty((1, 1), dtype=object)
        struct = np.zeros((1, 1), dtype=[("location", object), ("number", object)])
        struct[0, 0]["location"] = np.array(pts)
        struct[0, 0]["number"] = np.array([[len(pts)]], float)
        info[0, 0] = struct
        (root / f"train_data/{folder}").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / f"train_data/{folder}/GT_IMG_{k}.mat", {"image_info": info})
    return root


CROWDHUMAN_ID = "273271,abc"


def make_crowdhuman(root: Path) -> Path:
    """One 100x80 (W x H) image: 2 persons, one ignored person, one `mask` region, one person
    whose head is above the image (its point falls back to the visible box)."""
    write_image(root / f"Images/{CROWDHUMAN_ID}.jpg", 80, 100)
    write_image(root / "Images/273271,def.jpg", 40, 40, seed=1)
    boxes = [
        {"tag": "person", "hbox": [10, 10, 10, 10], "fbox": [5, 5, 30, 70], "vbox": [6, 6, 20, 40],
         "head_attr": {"ignore": 0, "occ": 1, "unsure": 0}, "extra": {"box_id": 0, "occ": 0}},
        {"tag": "person", "hbox": [50, 20, 8, 8], "fbox": [45, 15, 30, 90], "vbox": [45, 15, 20, 60],
         "head_attr": {"ignore": 0, "occ": 0, "unsure": 1}, "extra": {"box_id": 1, "occ": 1}},
        {"tag": "person", "hbox": [70, 5, 5, 5], "fbox": [68, 2, 10, 30], "vbox": [68, 2, 10, 30],
         "extra": {"box_id": 2, "ignore": 1}},
        {"tag": "mask", "hbox": [0, 0, 1, 1], "fbox": [80, 60, 15, 15], "vbox": [80, 60, 15, 15], "extra": {"ignore": 1}},
        {"tag": "person", "hbox": [30, -40, 10, 10], "fbox": [28, -40, 20, 100], "vbox": [28, 0, 20, 40],
         "head_attr": {"ignore": 1}, "extra": {"box_id": 4, "occ": 1}},
    ]
    lines = [json.dumps({"ID": CROWDHUMAN_ID, "gtboxes": boxes}),
             json.dumps({"ID": "273271,def", "gtboxes": [{"tag": "person", "hbox": [1, 1, 4, 4], "fbox": [0, 0, 10, 30],
                                                          "vbox": [0, 0, 10, 30], "head_attr": {}, "extra": {}}]})]
    (root / "annotation_train.odgt").write_text("\n".join(lines) + "\n")
    return root


def make_xmask(root: Path) -> tuple[Path, np.ndarray]:
    """train_data: IMG_1 (3 points, GT_IMG_1.npy, masks/IMG_1.npy), IMG_2 (IMG_2.npy, no mask)."""
    pts = np.array([[8.0, 8.0, 1.0], [24.0, 10.0, 1.0], [15.0, 24.0, 1.0]])
    write_image(root / "train_data/images/IMG_1.jpg", 32, 32)
    write_image(root / "train_data/images/IMG_2.jpg", 16, 16, seed=1)
    (root / "train_data/new-anno").mkdir(parents=True)
    (root / "train_data/masks").mkdir(parents=True)
    np.save(root / "train_data/new-anno/GT_IMG_1.npy", pts)
    np.save(root / "train_data/new-anno/IMG_2.npy", np.array([3.0, 4.0]))
    id_map = disc_map(32, 32, [(8, 8), (24, 10), (15, 24)], 4)
    np.save(root / "train_data/masks/IMG_1.npy", id_map)
    return root, id_map


def make_cclabeler(root: Path, points_per_image: dict[str, list[tuple[float, float]]], size=(64, 64)) -> Path:
    for k, (stem, pts) in enumerate(points_per_image.items()):
        write_image(root / f"images/{stem}.jpg", *size, seed=k)
        (root / "jsons").mkdir(parents=True, exist_ok=True)
        (root / f"jsons/{stem}.json").write_text(json.dumps(
            {"img_id": f"{stem}.jpg", "human_num": len(pts), "points": [{"x": x, "y": y} for x, y in pts], "boxes": []}))
    return root


def make_coco(root: Path) -> Path:
    """a.jpg (40x30, W x H): a polygon square, an uncompressed-RLE block, an iscrowd region;
    b.jpg: one compressed-RLE instance."""
    from pycocotools import mask as mask_utils

    h, w = 30, 40
    block = np.zeros((h, w), np.uint8, order="F")
    block[20:26, 30:38] = 1
    runs, last, count = [], 0, 0
    for v in block.flatten(order="F"):
        if v == last:
            count += 1
        else:
            runs.append(count)
            last, count = v, 1
    runs.append(count)
    compressed = mask_utils.encode(np.asfortranarray(block))
    compressed["counts"] = compressed["counts"].decode("ascii")
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": h, "width": w},
                   {"id": 9, "file_name": "b.jpg", "height": h, "width": w}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [2, 3, 10, 10],
             "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]], "area": 100},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [30, 20, 8, 6],
             "segmentation": {"size": [h, w], "counts": runs}, "area": 48},
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1, "bbox": [15, 15, 5, 5],
             "segmentation": [[15, 15, 20, 15, 20, 20, 15, 20]], "area": 25},
            {"id": 4, "image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [30, 20, 8, 6],
             "segmentation": compressed, "area": 48},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "instances.json").write_text(json.dumps(data))
    write_image(root / "images/a.jpg", h, w)
    write_image(root / "images/b.jpg", h, w, seed=1)
    return root
