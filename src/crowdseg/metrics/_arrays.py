"""Small conversions shared by the metric modules (tensors or arrays in, numpy out; no torch import)."""
from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """`x` (tensor, array or nested sequence) as a numpy array on the CPU, without gradients.

    Tensors are recognised without importing torch, so the file-based tools stay light.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def as_points(x: Any) -> np.ndarray:
    """(N, 2) float64 xy array; an empty input (None, [], (0,) tensor) gives shape (0, 2)."""
    if x is None:
        return np.zeros((0, 2), dtype=np.float64)
    arr = as_numpy(x, np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(arr.shape)}")
    return arr[:, :2]


def safe_ratio(num: float, den: float) -> float:
    """num / den, 0.0 where the denominator is 0 (an undefined metric is reported as 0)."""
    return float(num) / float(den) if den else 0.0
