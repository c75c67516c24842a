"""`crowdseg report`: mean +- std over seeds by experiment and label fraction, and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowdseg.cli import main
from crowdseg.report import find_runs, mean_std, run_facts, summarise


def fake_run(root: Path, experiment: str, fraction: float, seed: int, val_mae: float, iou: float) -> Path:
    run = root / experiment / f"r-lf{fraction:g}-s{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics").mkdir()
    (run / "config.yaml").write_text(f"name: {experiment}\nmethod: {experiment.split('/')[0]}\nseed: {seed}\n"
                                     f"labels:\n  fraction: {fraction}\n")
    (run / "metrics" / "val.json").write_text(json.dumps({"split": "val", "metrics": {"val/mae": val_mae,
                                                                                      "val/iou_c": iou}}))
    return run


def test_mean_std_over_seeds_and_plot(tmp_path, capsys):
    for seed, mae in enumerate((10.0, 12.0, 14.0)):
        fake_run(tmp_path / "runs", "xmask/synthetic", 10, seed, mae, 0.5 + 0.1 * seed)
    fake_run(tmp_path / "runs", "xmask/synthetic_supervised", 10, 0, 20.0, 0.3)
    fake_run(tmp_path / "runs", "xmask/synthetic", 40, 0, 8.0, 0.7)
    assert len(find_runs([tmp_path / "runs"])) == 5
    rows = summarise([run_facts(p) for p in find_runs([tmp_path / "runs"])])
    ten = next(r for r in rows if r["experiment"] == "xmask/synthetic" and r["fraction"] == 10)
    assert ten["n"] == 3 and ten["seeds"] == [0, 1, 2]
    assert ten["val/mae"] == pytest.approx((12.0, 2.0)) and ten["val/iou_c"][0] == pytest.approx(0.6)
    out = tmp_path / "plot.png"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "12.00 ± 2.00" in table and "xmask/synthetic_supervised" in table
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_std_of_one_value_and_no_runs(tmp_path):
    assert mean_std([3.0]) == (3.0, 0.0)
    assert main(["report", str(tmp_path)]) == 2
