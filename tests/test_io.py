"""Atomic writes leave ordinary, group-readable files (not mkstemp's 0600)."""
import os
import stat

import numpy as np

from crowdseg.io import write_json_atomic, write_npy_atomic, write_text_atomic


def test_atomic_writes_respect_the_umask(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_npy_atomic(tmp_path / "a.npy", np.zeros(2))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a.txt", "a.json", "a.npy"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~umask and mode & stat.S_IRGRP, oct(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.npy", "a.txt"], "no temporaries left"


def test_atomic_write_replaces_the_content(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "old")
    write_text_atomic(tmp_path / "a.txt", "new")
    write_json_atomic(tmp_path / "b.json", [1, 2])
    write_npy_atomic(tmp_path / "c.npy", np.arange(3))
    assert (tmp_path / "a.txt").read_text() == "new"
    assert (tmp_path / "b.json").read_text().split() == ["[", "1,", "2", "]"]
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2]
