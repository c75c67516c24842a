"""Counting errors: MAE, RMSE (crowd papers call it "MSE") and NAE.

Naming: the crowd-counting literature reports sqrt(mean((pred - gt)^2)) under the name "MSE".
It is a root mean squared error, so this module calls it `rmse` and also returns it under the
key `mse` as an alias, for tables that follow the papers. No key holds the un-rooted mean
squared error.

NAE (normalised absolute error, NWPU-Crowd) = mean |pred - gt| / gt over the images whose
ground-truth count is not zero. A metric over no images is reported as 0.0, as the official
NWPU evaluation code does.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from crowdseg.metrics._arrays import as_numpy, safe_ratio


def counting_sums(pred_counts: Any, gt_counts: Any) -> dict[str, float]:
    """Additive sums from which the counting errors follow.

    pred_counts, gt_counts: (B,) counts (tensor, array or list) of the same images.
    Returns {"abs_error", "sq_error", "images", "rel_error", "nonzero_images"}: sums of
    |pred - gt|, (pred - gt)^2, the image count, sum of |pred - gt| / gt over gt > 0, and the
    number of those images.
    """
    pred = as_numpy(pred_counts, np.float64).reshape(-1)
    gt = as_numpy(gt_counts, np.float64).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape[0]} predicted counts for {gt.shape[0]} ground-truth counts")
    err = pred - gt
    nonzero = gt != 0
    return {
        "abs_error": float(np.abs(err).sum()),
        "sq_error": float((err * err).sum()),
        "images": float(gt.shape[0]),
        "rel_error": float((np.abs(err[nonzero]) / gt[nonzero]).sum()),
        "nonzero_images": float(nonzero.sum()),
    }


def counting_from_sums(abs_error: float, sq_error: float, images: float, rel_error: float,
                       nonzero_images: float) -> dict[str, float]:
    """{"mae", "rmse", "mse" (= rmse, the papers' name), "nae"} from the sums of `counting_sums`."""
    rmse = math.sqrt(safe_ratio(sq_error, images))
    return {
        "mae": safe_ratio(abs_error, images),
        "rmse": rmse,
        "mse": rmse,
        "nae": safe_ratio(rel_error, nonzero_images),
    }


def counting_errors(pred_counts: Any, gt_counts: Any) -> dict[str, float]:
    """MAE, RMSE (also under "mse") and NAE of predicted vs. ground-truth counts (B,) each."""
    return counting_from_sums(**counting_sums(pred_counts, gt_counts))
