"""Preprocessing cache: same samples as reading the files, keyed by parameters, atomic, resumable."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import datamodules.cache as cache_module
from data_fixtures import SHARED_DATA, make_xmask
from datamodules.cache import PreprocessCache, cache_params
from datamodules.dataset import build_dataset
from datamodules.readers import READERS
from datamodules.transforms import TrainTransform

SHA = str(SHARED_DATA / "shanghaitech_A_samples")


def test_cache_gives_the_same_samples_as_the_files(tmp_path):
    online = build_dataset("sha", SHA, "all", max_size=256)
    cached = build_dataset("sha", SHA, "all", max_size=256, cache_dir=str(tmp_path), progress=False)
    assert cached.names == online.names
    for i in range(len(online)):
        a, b = online[i], cached[i]
        assert a["image"].shape[-2:] == b["image"].shape[-2:] and max(a["image"].shape[-2:]) == 256
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["points"], b["points"])
        assert a["meta"] == b["meta"] and b["meta"]["scale"] == 256 / 1024
    assert isinstance(cached.load_raw(0)["image"], np.memmap)
    # the full training pipeline (crop from the memory map) is identical too
    online.transform, cached.transform = TrainTransform(96, seed=3), TrainTransform(96, seed=3)
    for i in range(len(online)):
        assert torch.equal(online[i]["image"], cached[i]["image"])
        assert torch.equal(online[i]["points"], cached[i]["points"])


def test_cache_stores_instance_maps(tmp_path):
    root, id_map = make_xmask(tmp_path / "xm")
    ds = build_dataset("xmask", str(root), "train", cache_dir=str(tmp_path / "cache"), progress=False)
    assert np.array_equal(ds[0]["instance_map"].numpy(), id_map) and ds[1]["instance_map"] is None


def test_cache_folder_is_keyed_by_parameters(tmp_path):
    a = build_dataset("sha", SHA, "all", max_size=128, cache_dir=str(tmp_path), progress=False)
    b = build_dataset("sha", SHA, "all", max_size=200, cache_dir=str(tmp_path), progress=False)
    c = build_dataset("sha", SHA, "all", max_size=128, cache_dir=str(tmp_path), progress=False)
    assert a.cache.folder != b.cache.folder and a.cache.folder == c.cache.folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.cache.folder.name, b.cache.folder.name])
    assert c.cache.missing(c.records) == []


def test_interrupted_build_leaves_no_half_files_and_resumes(tmp_path, monkeypatch):
    records, _ = READERS["sha"](SHA, "all")
    for r in records:
        r.size = None
    cache = PreprocessCache(tmp_path, cache_params("sha", SHA, "all", 128, {}, records))
    real_write = cache_module.write_npy_atomic
    calls = {"n": 0}

    def failing_write(path, array):  # the third image write is interrupted mid-way
        calls["n"] += 1
        if calls["n"] == 3:
            with cache_module.atomic_path(path) as tmp:
                tmp.write_bytes(b"half an image")
                raise KeyboardInterrupt
        real_write(path, array)

    monkeypatch.setattr(cache_module, "write_npy_atomic", failing_write)
    with pytest.raises(KeyboardInterrupt):
        cache.build(records, progress=False)
    monkeypatch.setattr(cache_module, "write_npy_atomic", real_write)
    files = sorted(p.name for p in cache.folder.rglob("*") if p.is_file())
    assert not any(name.endswith(".tmp") for name in files)  # nothing half-written is left
    assert len(cache.missing(records)) == 3 and len(list((cache.folder / "images").iterdir())) == 2
    # a stale temporary file of a killed process (SIGKILL) is removed by the next build
    (cache.folder / "labels" / ".IMG_4.jpg.npz.abc123.npz.tmp").write_bytes(b"junk")
    done_before = {r.name: cache._paths(r)[2].stat().st_mtime_ns for r in records if cache.is_done(r)}
    assert cache.build(records, progress=False) == []
    assert cache.missing(records) == [] and not list(cache.folder.rglob("*.tmp"))
    for r in records:  # finished records were not redone
        if r.name in done_before:
            assert cache._paths(r)[2].stat().st_mtime_ns == done_before[r.name]


def test_parallel_build_matches_serial(tmp_path):
    serial = build_dataset("sha", SHA, "all", max_size=160, cache_dir=str(tmp_path / "a"), progress=False)
    parallel = build_dataset("sha", SHA, "all", max_size=160, cache_dir=str(tmp_path / "b"), num_workers=2,
                             progress=False)
    for i in range(len(serial)):
        assert torch.equal(serial[i]["image"], parallel[i]["image"])


def test_unreadable_image_during_caching_is_reported_or_skipped(tmp_path):
    import shutil

    root = tmp_path / "sha"
    shutil.copytree(SHA, root)
    data = (root / "images" / "IMG_51.jpg").read_bytes()
    # complete (end marker present, so it passes the build checks) but undecodable: caught while caching
    (root / "images" / "IMG_51.jpg").write_bytes(data[:400] + bytes(len(data) - 402) + data[-2:])
    from crowdseg.errors import DataError

    with pytest.raises(DataError, match=r"IMG_51\.jpg: unreadable or truncated image"):
        build_dataset("sha", str(root), "all", cache_dir=str(tmp_path / "cache"), progress=False)
    ds = build_dataset("sha", str(root), "all", cache_dir=str(tmp_path / "cache"), on_bad_annotation="skip",
                       progress=False)
    assert len(ds) == 4 and "IMG_51.jpg" not in ds.names
