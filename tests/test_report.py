"""`crowdseg report`: mean +- std over seeds by experiment and label fraction, and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowdseg.cli import main
from crowdseg.report import figure, find_runs, format_table, mean_std, run_facts, summarise


def fake_run(root: Path, experiment: str, fraction: float, seed: int, val_mae: float, iou: float | None,
             labeled: int | None = None, labeled_in_config: bool = True) -> Path:
    """A run folder; `iou` None: a counting method; `labeled`: its labeled-image count, in
    config.yaml's `labels` or (`labeled_in_config` False) only in metrics/val.json's."""
    run = root / experiment / f"r-lf{fraction:g}-s{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics").mkdir()
    labels = f"  labeled_images: {labeled}\n" if labeled is not None and labeled_in_config else ""
    (run / "config.yaml").write_text(f"name: {experiment}\nmethod: {experiment.split('/')[0]}\nseed: {seed}\n"
                                     f"labels:\n  fraction: {fraction}\n{labels}")
    metrics = {"val/mae": val_mae, **({} if iou is None else {"val/iou_c": iou})}
    record = {"split": "val", "metrics": metrics, "labels": {"fraction": fraction, "labeled_images": labeled}}
    (run / "metrics" / "val.json").write_text(json.dumps(record))
    return run


def counting_rows(root: Path) -> list[dict]:
    """Two density runs at 10 % (18 labeled images, one recorded only in its metrics) and one at 40 %."""
    fake_run(root, "density/synthetic", 10, 0, 5.0, None, labeled=18)
    fake_run(root, "density/synthetic", 10, 1, 7.0, None, labeled=18, labeled_in_config=False)
    fake_run(root, "density/synthetic", 40, 0, 3.0, None, labeled=72)
    return summarise([run_facts(p) for p in find_runs([root])])


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


def test_counting_report_plots_no_iou_panel(tmp_path):
    fig = figure(counting_rows(tmp_path / "runs"))
    assert [ax.get_ylabel() for ax in fig.axes] == ["MAE (lower is better)"]
    mixed = [*counting_rows(tmp_path / "more"), {"experiment": "xmask/synthetic", "method": "xmask", "fraction": 10.0,
                                                 "n": 1, "seeds": [0], "val/iou_c": (0.3, 0.0)}]
    assert len(figure(mixed).axes) == 2


def test_table_has_the_labeled_images_column(tmp_path):
    rows = counting_rows(tmp_path / "runs")
    assert [(r["fraction"], r["labeled_images"]) for r in rows] == [(10, [18]), (40, [72])]
    header, _, ten, forty = format_table(rows).splitlines()
    assert header.split()[4] == "labeled" and ten.split()[3] == "18" and forty.split()[3] == "72"
    fake_run(tmp_path / "old", "p2p/synthetic", 100, 0, 5.0, None)  # a run that recorded no count
    assert format_table(summarise([run_facts(p) for p in find_runs([tmp_path / "old"])])).splitlines()[2].split()[3] == "-"


def test_log_axis_ticks_are_plain_numbers(tmp_path):
    fig = figure(counting_rows(tmp_path / "runs"))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "40"]
    assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
