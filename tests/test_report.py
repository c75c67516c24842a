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


def _log_validations(run: Path, rows: list[tuple[int, float, float]]) -> None:
    """Lightning's CSV: a training row between validations; a validation after N steps in row N - 1."""
    lines = ["epoch,step,train/loss,val/mae,val/teacher_mae"]
    for steps, mae, teacher in rows:
        lines += [f"0,{steps - 2},1.0,,", f"0,{steps - 1},,{mae},{teacher}"]
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_arms_compared_at_one_step_and_at_their_best_validation(tmp_path, capsys):
    semi = [fake_run(tmp_path / "runs", "xmask/shb_cpu", 5, seed, 99.0, None) for seed in (0, 1)]
    control = fake_run(tmp_path / "runs", "xmask/shb_cpu_supervised", 5, 0, 99.0, None)
    _log_validations(semi[0], [(100, 30.0, 28.0), (200, 20.0, 22.0)])
    _log_validations(semi[1], [(100, 34.0, 26.0), (200, 24.0, 27.0)])
    _log_validations(control, [(100, 40.0, 41.0), (200, 35.0, 36.0), (300, 30.0, 31.0)])

    assert main(["report", str(tmp_path / "runs"), "--at-step", "200", "--out", str(tmp_path / "a.png"),
                 "--json", str(tmp_path / "a.json")]) == 0
    rows = {r["experiment"]: r for r in json.loads((tmp_path / "a.json").read_text())}
    assert rows["xmask/shb_cpu"]["val/mae"] == pytest.approx([22.0, 2.8284271])  # not the 99 of val.json
    assert rows["xmask/shb_cpu"]["val/teacher_mae"][0] == pytest.approx(24.5)
    assert rows["xmask/shb_cpu_supervised"]["val/mae"][0] == 35.0 and rows["xmask/shb_cpu"]["steps"] == [200]

    assert main(["report", str(tmp_path / "runs"), "--best", "val/teacher_mae", "--out", str(tmp_path / "b.png"),
                 "--json", str(tmp_path / "b.json")]) == 0
    rows = {r["experiment"]: r for r in json.loads((tmp_path / "b.json").read_text())}
    assert rows["xmask/shb_cpu"]["steps"] == [100, 200]          # seed 0's best at 200 (22), seed 1's at 100 (26)
    assert rows["xmask/shb_cpu"]["val/teacher_mae"][0] == pytest.approx((22.0 + 26.0) / 2)
    assert rows["xmask/shb_cpu"]["val/mae"][0] == pytest.approx((20.0 + 34.0) / 2)  # of the same validations
    assert rows["xmask/shb_cpu_supervised"]["val/mae"][0] == 30.0

    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs"), "--at-step", "300", "--out", str(tmp_path / "c.png")]) == 2
    assert "no validation after 300 steps (it validated after 100, 200)" in capsys.readouterr().err
