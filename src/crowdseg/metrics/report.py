"""Writing a split's final metrics to `<run_dir>/metrics/<split>.json` (atomically)."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from crowdseg.io import write_json_atomic


def to_builtin(value: Any) -> Any:
    """Tensors, numpy scalars/arrays and nested containers as plain JSON values (NaN/inf -> None)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(run_dir: str | os.PathLike, split: str, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics` (nested dicts of scalars / tensors) to `<run_dir>/metrics/<split>.json`.

    The file is written atomically (a killed run never leaves half a file); keys are kept as
    given (e.g. "val/sigma_l_f1"). Returns the path written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or split in (".", ".."):
        raise ValueError(f"split name {split!r} must be a plain file name (letters, digits, _ . -)")
    path = Path(run_dir) / "metrics" / f"{split}.json"
    write_json_atomic(path, to_builtin(metrics))
    return path
