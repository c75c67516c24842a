"""Counting errors and the metrics JSON writer."""
import json
import math

import numpy as np
import pytest
import torch

from crowdseg.metrics import write_metrics_json
from crowdseg.metrics.counting import counting_errors
from crowdseg.metrics.torch_metrics import CountingMetrics


def test_counting_errors_hand_computed():
    # errors 2, 0, -5; NAE only over the two images with a non-zero count: (2/8 + 5/10) / 2
    out = counting_errors([10, 0, 5], [8, 0, 10])
    assert out["mae"] == pytest.approx(7 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt(29 / 3))
    assert out["mse"] == out["rmse"]  # the papers' "MSE" is the root mean squared error
    assert out["nae"] == pytest.approx(0.375)


def test_counting_errors_empty_and_all_zero_ground_truth():
    assert counting_errors([], []) == {"mae": 0.0, "rmse": 0.0, "mse": 0.0, "nae": 0.0}
    out = counting_errors([3, 1], [0, 0])
    assert out["mae"] == pytest.approx(2.0) and out["nae"] == 0.0


def test_counting_errors_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 predicted counts for 3"):
        counting_errors([1, 2], [1, 2, 3])


def test_counting_metric_over_batches_equals_pure_function():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 300, size=37)
    gt = rng.integers(0, 300, size=37)
    gt[::7] = 0
    metric = CountingMetrics()
    for lo in range(0, 37, 8):
        metric.update(torch.tensor(pred[lo:lo + 8]), torch.tensor(gt[lo:lo + 8]))
    got = {k: float(v) for k, v in metric.compute().items()}
    want = counting_errors(pred, gt)
    assert got == pytest.approx(want)
    metric.reset()
    assert float(metric.images) == 0.0 and float(metric.abs_error) == 0.0


def test_write_metrics_json_atomic_and_plain(tmp_path):
    metrics = {"val/mae": torch.tensor(1.5, dtype=torch.float64), "val/sigma_l_f1": np.float32(0.25),
               "val/count": torch.tensor(3), "nested": {"levels": torch.tensor([0.5, 1.0])},
               "undefined": float("nan")}
    path = write_metrics_json(tmp_path / "run", "val", metrics)
    assert path == tmp_path / "run" / "metrics" / "val.json"
    data = json.loads(path.read_text())
    assert data == {"val/mae": 1.5, "val/sigma_l_f1": 0.25, "val/count": 3,
                    "nested": {"levels": [0.5, 1.0]}, "undefined": None}
    assert [p.name for p in path.parent.iterdir()] == ["val.json"]  # no temporary file left
    with pytest.raises(ValueError, match="plain file name"):
        write_metrics_json(tmp_path, "../escape", metrics)
