"""Atomic file writes: a killed process never leaves a half-written file behind.

Every writer in the project (checkpoints aside, which Lightning writes) goes through these helpers:
the data is written to a temporary file in the target directory and moved into place with
`os.replace`, which is atomic on POSIX file systems. A kill during a write leaves only that
temporary file, which `remove_stale_temporaries` deletes when the next run starts (checkpoints of
`crowdseg fit`, mask folders of `crowdseg masks`). `CONFIG_KEY` names the entry of a checkpoint that
holds its run's resolved config (written by crowdseg.train, read by crowdseg.runs and the weight loader).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

CONFIG_KEY = "crowdseg_config"  # the key of a checkpoint's resolved config (YAML text), written by crowdseg.train


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary name ends with `suffix` (default: the target's own), so writers that infer the
    format from the extension (cv2.imwrite, np.save) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + (suffix or path.suffix),
                               dir=path.parent)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; outputs are read like any file (umask applies)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


TEMPORARY = ".*.tmp*"  # the names `atomic_path` gives its temporary files: `.<target name>.<random>.tmp<suffix>`


def remove_stale_temporaries(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of `atomic_path` that a killed process left in `folders` (never read:
    the write they belonged to did not replace its target); returns them. Call it from one process
    before a run writes there again."""
    removed = []
    for folder in folders:
        for tmp in sorted(Path(folder).glob(TEMPORARY)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
