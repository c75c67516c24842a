"""Preprocessing cache: records decoded, resized (long side <= max_size) and stored as raw arrays.

Layout of one cache (a folder per parameter set, named `<dataset>-<hash>`):

    params.json            what the hash covers (reader, root, split, options, max_size, sources)
    images/<key>.npy       (H, W, C) uint8, C = 1 for grayscale images
    masks/<key>.npy        (H, W) int32 instance-id map, when the record has one
    labels/<key>.npz       points, boxes, per-point attributes, meta; written last

Every file is written atomically (crowdseg.io), and a record counts as done only when its labels
file exists, so a killed build leaves no half files and the next build continues where it stopped.
A file lock serialises concurrent builders (e.g. DDP ranks): the first builds, the others find the
work done. Reading an image back is a memory map, so a random crop touches only the rows it needs.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from crowdseg.errors import DataError
from crowdseg.io import atomic_path, write_json_atomic, write_npy_atomic
from datamodules.loading import RawSample, box_keys, load_record
from datamodules.readers.common import Problem, Record

CACHE_VERSION = 1


def record_key(record: Record) -> str:
    """A file-name-safe key of a record (names may carry a split prefix like "val/0003.jpg")."""
    return record.name.replace("/", "__").replace("\\", "__")


def source_fingerprint(records: list[Record]) -> str:
    """Hash of every record's source files (name, size, mtime): edited annotations get a new cache."""
    h = hashlib.sha1()
    for r in records:
        h.update(r.name.encode())
        for p in (r.image_path, r.ann_path, r.mask_path):
            if p is not None and os.path.exists(p):
                st = os.stat(p)
                h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(str(len(r.points)).encode())
    return h.hexdigest()


def cache_params(dataset: str, root: str | None, split: str, max_size: int | None, options: dict[str, Any],
                 records: list[Record]) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "dataset": dataset, "root": str(Path(root).resolve()) if root else None,
            "split": split, "max_size": max_size, "options": {k: options[k] for k in sorted(options)},
            "sources": source_fingerprint(records)}


class PreprocessCache:
    """A cache folder for one parameter set. `build` fills it, `load` reads a record back."""

    def __init__(self, cache_dir: str | os.PathLike, params: dict[str, Any]):
        self.params = params
        digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.folder = Path(cache_dir) / f"{params['dataset']}-{digest}"
        self._labels: dict[str, RawSample] = {}  # per process: labels are small, read each file once

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_labels": {}}

    def _paths(self, record: Record) -> tuple[Path, Path, Path]:
        key = record_key(record)
        return (self.folder / "images" / f"{key}.npy", self.folder / "masks" / f"{key}.npy",
                self.folder / "labels" / f"{key}.npz")

    def is_done(self, record: Record) -> bool:
        return self._paths(record)[2].exists()

    def missing(self, records: list[Record]) -> list[Record]:
        return [r for r in records if not self.is_done(r)]

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def build(self, records: list[Record], num_workers: int = 0, progress: bool = True) -> list[Problem]:
        """Preprocess the records not yet cached. Returns a Problem per record that failed to decode."""
        with self._lock():
            for sub in ("images", "masks", "labels"):
                (self.folder / sub).mkdir(exist_ok=True)
                for stale in (self.folder / sub).glob(".*.tmp"):  # left by a killed build; we hold the lock
                    stale.unlink(missing_ok=True)
            if not (self.folder / "params.json").exists():
                write_json_atomic(self.folder / "params.json", self.params)
            todo = self.missing(records)
            if not todo:
                return []
            problems: list[Problem] = []
            jobs = [(r, self.params["dataset"], self.params["max_size"], self._paths(r)) for r in todo]
            bar = tqdm(total=len(jobs), desc=f"caching {self.params['dataset']} ({self.folder.name})",
                       disable=not progress, unit="img")
            if num_workers > 0:
                # spawn, not fork: a forked child of a process whose OpenCV / torch thread pools have
                # run can deadlock on a lock held at fork time (seen as a hung cache build in pytest)
                with get_context("spawn").Pool(num_workers, initializer=_worker_init) as pool:
                    for result in pool.imap_unordered(_build_one, jobs, chunksize=1):
                        if result is not None:
                            problems.append(result)
                        bar.update()
            else:
                for job in jobs:
                    result = _build_one(job)
                    if result is not None:
                        problems.append(result)
                    bar.update()
            bar.close()
            return problems

    def load(self, record: Record) -> RawSample:
        """The raw sample of a cached record; the image (and mask) are read-only memory maps."""
        image_path, mask_path, labels_path = self._paths(record)
        labels = self._labels.get(record.name)
        if labels is None:
            labels = self._labels[record.name] = self._read_labels(record, labels_path)
        raw: RawSample = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in labels.items()}
        raw["point_attrs"] = {k: v.copy() for k, v in labels["point_attrs"].items()}
        raw["meta"] = dict(labels["meta"])
        raw["image"] = np.load(image_path, mmap_mode="r")
        raw["instance_map"] = np.load(mask_path, mmap_mode="r") if mask_path.exists() else None
        return raw

    @staticmethod
    def _read_labels(record: Record, labels_path: Path) -> RawSample:
        if not labels_path.exists():
            raise DataError(f"{labels_path}: {record.name} is not in the preprocessing cache (build it first)")
        with np.load(labels_path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            raw: RawSample = {"points": z["points"], "point_attrs": {}, "boxes": None, "ignore_boxes": None}
            for key in z.files:
                if key.startswith("attr_"):
                    raw["point_attrs"][key[5:]] = z[key]
                elif key.endswith("boxes"):
                    raw[key] = z[key]
        meta["orig_size"] = tuple(meta["orig_size"])
        raw["meta"] = meta
        return raw


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)


def _build_one(job) -> Problem | None:
    record, dataset, max_size, (image_path, mask_path, labels_path) = job
    try:
        raw = load_record(record, dataset, max_size)
    except DataError as exc:
        path, _, msg = str(exc).partition(": ")
        return Problem(path, msg or str(exc), record=record.name)
    write_npy_atomic(image_path, np.ascontiguousarray(raw["image"]))
    if raw.get("instance_map") is not None:
        write_npy_atomic(mask_path, raw["instance_map"].astype(np.int32))
    arrays = {"points": raw["points"], "meta": np.array(json.dumps(raw["meta"], default=_json_default))}
    for key in box_keys(raw):
        arrays[key] = raw[key]
    for key, value in raw["point_attrs"].items():
        arrays[f"attr_{key}"] = value
    with atomic_path(labels_path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return None


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(type(obj).__name__)

