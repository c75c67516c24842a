"""COCO instance JSON (CIS, `shanghangjiang/CIS:CIS.json`): polygons or RLE -> instance masks.

`root` is the JSON file or a folder holding exactly one `.json`; images are looked up in
`image_dir` (default `<root folder>/images` when it exists). Without images the records still carry
points, boxes and masks (size from the JSON), which is what mask evaluation needs; loading such a
sample's pixels raises a DataError.

Instances: annotations with `iscrowd = 0`, in id order (`iscrowd = 1` regions become
`ignore_boxes`). Overlapping masks are resolved into one id map by painting larger instances
first, so a smaller (usually nearer) person stays whole. The point of instance k is the pixel of
its visible region farthest from the region's border (so it always lies inside its own mask).
Boxes are COCO `bbox` [x, y, w, h] -> xyxy; `area` (the box area in CIS) is not used.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from crowdseg.errors import DataError
from datamodules.readers.common import Problem, Record, read_json, xywh_to_xyxy


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO segmentation: polygon list, uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DataError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def cropped_mask(segmentation, height: int, width: int) -> tuple[int, int, np.ndarray]:
    """(y0, x0, mask) with `mask` the segmentation's bool mask inside its bounding rectangle.

    Polygons are rasterised by pycocotools on a canvas shifted by whole pixels, which gives the same
    pixels as the full-image mask at a cost proportional to the instance, not the image.
    """
    if isinstance(segmentation, list):
        polygons = [np.asarray(p, np.float64) for p in segmentation if len(p) >= 6]
        if not polygons:
            return 0, 0, np.zeros((0, 0), bool)
        xs = np.concatenate([p[0::2] for p in polygons])
        ys = np.concatenate([p[1::2] for p in polygons])
        x0, y0 = max(int(np.floor(xs.min())), 0), max(int(np.floor(ys.min())), 0)
        x1, y1 = min(int(np.ceil(xs.max())) + 2, width), min(int(np.ceil(ys.max())) + 2, height)
        if x1 <= x0 or y1 <= y0:
            return 0, 0, np.zeros((0, 0), bool)
        shifted = []
        for p in polygons:
            q = p.copy()
            q[0::2] -= x0
            q[1::2] -= y0
            shifted.append(q.tolist())
        rle = mask_utils.merge(mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0))
        return y0, x0, mask_utils.decode(rle).astype(bool)
    full = segmentation_mask(segmentation, height, width)
    ys, xs = np.nonzero(full)
    if len(ys) == 0:
        return 0, 0, np.zeros((0, 0), bool)
    return int(ys.min()), int(xs.min()), full[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def rasterize_instances(segmentations: list, height: int, width: int) -> np.ndarray:
    """(H, W) int32 id map of instances (id k + 1 = segmentation k), larger instances painted first."""
    return _paint(segmentations, height, width)[0]


def _paint(segmentations: list, height: int, width: int) -> tuple[np.ndarray, list]:
    crops = [cropped_mask(s, height, width) for s in segmentations]
    id_map = np.zeros((height, width), np.int32)
    for k in sorted(range(len(crops)), key=lambda k: -int(crops[k][2].sum())):
        y0, x0, m = crops[k]
        if m.size:
            id_map[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = k + 1
    return id_map, crops


def interior_point(mask: np.ndarray, max_side: int = 64) -> np.ndarray | None:
    """xy of a pixel of `mask` (H, W) bool far from its border; None for an empty mask.

    The distance transform runs on every `stride`-th pixel (so at most `max_side` per side): the
    result is always a pixel of the mask, near its most interior one.
    """
    stride = max(1, -(-max(mask.shape) // max_side))
    small = mask[::stride, ::stride]
    if not small.any():
        if stride == 1 or not mask.any():
            return None
        stride, small = 1, mask
    dist = cv2.distanceTransform(np.pad(small.astype(np.uint8), 1), cv2.DIST_L2, 3)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([(c - 1) * stride, (r - 1) * stride], np.float32)


def instances_and_points(segmentations: list, boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The id map and (N, 2) points: the interior point of each instance's visible region (of its
    full mask when another instance covers it entirely, its box centre when the mask is empty)."""
    id_map, crops = _paint(segmentations, height, width)
    points = np.zeros((len(segmentations), 2), np.float32)
    for k, (y0, x0, m) in enumerate(crops):
        p = None
        if m.size:
            visible = id_map[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] == k + 1
            p = interior_point(visible)
            if p is None:
                p = interior_point(m)
        if p is None:
            b = boxes[k]
            p = np.clip([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2], 0, [width - 1, height - 1]).astype(np.float32)
            points[k] = p
        else:
            points[k] = p + np.array([x0, y0], np.float32)
    return id_map, points


def _json_path(root: Path) -> Path:
    if root.is_file():
        return root
    if not root.is_dir():
        raise DataError(f"{root}: COCO annotation file or folder not found")
    files = sorted(root.glob("*.json"))
    if len(files) != 1:
        raise DataError(f"{root}: expected exactly one COCO .json file, found {len(files)}")
    return files[0]


def read_coco(root: str | Path, split: str = "all", image_dir: str | Path | None = None,
              category_ids: list[int] | None = None) -> tuple[list[Record], list[Problem]]:
    """Records of a COCO instance file; `split` is unused (one file is one split)."""
    path = _json_path(Path(root))
    data = read_json(path)
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: key '{key}' missing or not a list")
    folder = Path(image_dir) if image_dir else (path.parent / "images")
    has_images = folder.is_dir()
    if image_dir and not has_images:
        raise DataError(f"{folder}: image folder not found")
    by_image: dict[int, list[dict]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "segmentation", "bbox"} <= set(ann):
            raise DataError(f"{path}: key 'annotations[{i}]' needs 'image_id', 'segmentation' and 'bbox'")
        if category_ids is None or ann.get("category_id") in category_ids:
            by_image.setdefault(ann["image_id"], []).append(ann)
    problems: list[Problem] = []
    records = []
    for i, info in enumerate(data["images"]):
        try:
            image_id, name, h, w = info["id"], info["file_name"], int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: key 'images[{i}]' needs 'id', 'file_name', 'height' and 'width'") from None
        anns = sorted(by_image.pop(image_id, []), key=lambda a: a.get("id", 0))
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        image = folder / name if has_images else None
        if image is not None and not image.exists():
            problems.append(Problem(str(path), f"key 'images[{i}]': image {name} not found in {folder}", record=name))
            continue
        segs = [a["segmentation"] for a in anns]
        boxes = xywh_to_xyxy(np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4))
        try:
            _, points = instances_and_points(segs, boxes, h, w)
        except (DataError, ValueError, TypeError) as exc:
            problems.append(Problem(str(path), f"image {name} (id {image_id}): bad segmentation ({exc})", record=name))
            continue
        records.append(Record(name, image, points, boxes, ann_path=path, size=(h, w), polygons=segs,
                              ignore_boxes=xywh_to_xyxy(np.array([a["bbox"] for a in crowd], np.float32).reshape(-1, 4)),
                              labels={"image_id": image_id}))
    for image_id in by_image:
        problems.append(Problem(str(path), f"annotations refer to image id {image_id}, which 'images' does not list"))
    return records, problems
