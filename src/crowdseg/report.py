"""`crowdseg report`: compare runs across label fractions and seeds (what a team reads after a sweep).

Each run contributes one row of facts: its experiment, method, real label fraction, seed and the
final metrics of `metrics/val.json` and `metrics/test.json` (or, with `--wandb`, a wandb run's
config and summary). Runs are grouped by experiment and label fraction; the table gives the number
of labeled images, mean +- std over seeds and the number of runs, and a PNG plots MAE and Mean IoU_C
(the ones some run has) against the label fraction, one line per experiment.

Arms of a comparison are compared where they are comparable: `--at-step N` takes every run's
validation after N optimizer steps (from its `csv/metrics.csv`), `--best KEY` the validation where
KEY was lowest (the one best.ckpt holds when KEY is the run's monitored metric).

    crowdseg report runs/                       # every run below runs/
    crowdseg report runs/a runs/b --out cmp.png
    crowdseg report runs/xmask --at-step 800    # every arm at the same step
    crowdseg report runs/xmask --best val/teacher_mae
    crowdseg report --wandb entity/project
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from crowdseg.errors import DataError

COLUMNS = ("val/mae", "val/teacher_mae", "val/iou_c", "test/mae", "test/iou_c")  # shown when some run has them
PLOTTED = ("mae", "iou_c")


@dataclass
class RunFacts:
    experiment: str
    method: str
    fraction: float
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    where: str = ""
    labeled_images: Optional[int] = None
    step: Optional[int] = None  # the validation the metrics are of (--at-step / --best)


def labeled_images(*labels: Any) -> Optional[int]:
    """The first `labeled_images` among `labels` sections (a run's config or metrics record), if any."""
    for section in labels:
        if isinstance(section, dict) and section.get("labeled_images") is not None:
            return int(section["labeled_images"])
    return None


def run_facts(run_dir: Path) -> RunFacts:
    """The facts of one run directory (its config.yaml and metrics/*.json)."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{run_dir / 'config.yaml'}: unreadable run config ({err})") from None
    labels = cfg.get("labels") or {}
    fraction = labels.get("fraction")
    if fraction is None:
        fraction = (cfg.get("data") or {}).get("label_fraction", 100.0)
    metrics: dict[str, float] = {}
    recorded = [labels]
    for split in ("val", "test"):
        path = run_dir / "metrics" / f"{split}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            values = record.get("metrics", record)  # older runs wrote the metrics flat
            metrics.update({k: float(v) for k, v in values.items() if isinstance(v, (int, float))})
            recorded.append(record.get("labels"))
    return RunFacts(cfg.get("name", run_dir.parent.name), cfg.get("method", "?"), float(fraction),
                    int(cfg.get("seed", 0)), _aliases(metrics), str(run_dir), labeled_images(*recorded))


def val_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """{optimizer steps done: the val metrics logged then} of a run, from its `csv/metrics.csv`
    (Lightning writes a validation after N steps in the row of step N - 1)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise DataError(f"{path}: no metrics log (the run has not validated yet)")
    history: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if k and k.startswith("val/") and v not in ("", None)}
            if values and row.get("step"):
                history.setdefault(int(float(row["step"])) + 1, {}).update(values)
    return history


def at_step(facts: RunFacts, step: int) -> RunFacts:
    """`facts` with the val metrics of the run's validation after `step` optimizer steps."""
    history = val_history(Path(facts.where))
    if step not in history:
        raise DataError(f"{facts.where}: no validation after {step} steps (it validated after "
                        f"{', '.join(map(str, sorted(history))) or 'none'})")
    return _with_val(facts, history[step], step)


def at_best(facts: RunFacts, key: str) -> RunFacts:
    """`facts` with the val metrics of the run's validation where `key` was lowest."""
    history = {s: m for s, m in val_history(Path(facts.where)).items() if key in m}
    if not history:
        raise DataError(f"{facts.where}: no validation logged {key!r}")
    step = min(history, key=lambda s: (history[s][key], s))
    return _with_val(facts, history[step], step)


def _with_val(facts: RunFacts, val: dict[str, float], step: int) -> RunFacts:
    kept = {k: v for k, v in facts.metrics.items() if not k.startswith("val/") or k == "val/mae_mean_baseline"}
    return RunFacts(facts.experiment, facts.method, facts.fraction, facts.seed, _aliases({**kept, **val}),
                    facts.where, facts.labeled_images, step)


def _aliases(metrics: dict[str, float]) -> dict[str, float]:
    """Mean IoU_C under one name (`<split>/iou_c`) whichever key a method logs it as."""
    out = dict(metrics)
    for split in ("val", "test"):
        for key in (f"{split}/mean_iou_c", f"{split}/iou_c_student"):
            if key in metrics and f"{split}/iou_c" not in out:
                out[f"{split}/iou_c"] = metrics[key]
    return out


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (holding config.yaml) at or below `paths`."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such run directory")
        if (path / "config.yaml").is_file():
            runs.append(path)
        else:
            runs += sorted(p.parent for p in path.rglob("config.yaml") if (p.parent / "checkpoints").exists())
    if not runs:
        raise DataError(f"no runs (folders with config.yaml and checkpoints/) under {', '.join(map(str, paths))}")
    return runs


def wandb_facts(project: str) -> list[RunFacts]:
    """The facts of every finished run of a wandb project ("entity/project")."""
    import wandb

    facts = []
    for run in wandb.Api().runs(project):
        cfg = dict(run.config)
        labels = cfg.get("labels") or {}
        fraction = labels.get("fraction") or (cfg.get("data") or {}).get("label_fraction", 100.0)
        metrics = {k: float(v) for k, v in dict(run.summary).items()
                   if isinstance(v, (int, float)) and k.startswith(("val/", "test/"))}
        facts.append(RunFacts(cfg.get("name", run.group or "?"), cfg.get("method", "?"), float(fraction),
                              int(cfg.get("seed", 0)), _aliases(metrics), run.url, labeled_images(labels)))
    return facts


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(facts: list[RunFacts]) -> list[dict[str, Any]]:
    """One row per (experiment, label fraction): n runs, seeds, the labeled-image counts the runs
    recorded (sorted, distinct) and mean / std of every metric."""
    groups: dict[tuple[str, float], list[RunFacts]] = {}
    for f in facts:
        groups.setdefault((f.experiment, round(f.fraction, 3)), []).append(f)
    rows = []
    for (experiment, fraction), runs in sorted(groups.items()):
        row: dict[str, Any] = {"experiment": experiment, "method": runs[0].method, "fraction": fraction,
                               "n": len(runs), "seeds": sorted(r.seed for r in runs),
                               "steps": sorted({r.step for r in runs} - {None}),
                               "labeled_images": sorted({r.labeled_images for r in runs} - {None})}
        for key in sorted({k for r in runs for k in r.metrics}):
            values = [r.metrics[key] for r in runs if key in r.metrics]
            row[key] = mean_std(values)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    with_steps = any(r.get("steps") for r in rows)  # --at-step / --best: the validations compared
    header = ["experiment", "method", "label %", "labeled", "n", *(["step"] if with_steps else []), *columns]
    lines = [header]
    for r in rows:
        labeled = "/".join(map(str, r.get("labeled_images", []))) or "-"
        cells = [r["experiment"], r["method"], f"{r['fraction']:g}", labeled, str(r["n"])]
        if with_steps:
            cells.append("/".join(map(str, r.get("steps", []))) or "-")
        for c in columns:
            if c in r:
                mean, std = r[c]
                cells.append(f"{mean:.3f} ± {std:.3f}" if "iou" in c else f"{mean:.2f} ± {std:.2f}")
            else:
                cells.append("-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plotted_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics of `PLOTTED` that some row has (val or test); MAE alone when none has any."""
    present = [m for m in PLOTTED if any(f"{split}/{m}" in r for r in rows for split in ("val", "test"))]
    return present or list(PLOTTED[:1])


def figure(rows: list[dict[str, Any]]):
    """The matplotlib figure of `plot`: one panel per plotted metric, label fraction on a log axis
    with plain-number ticks at the fractions the runs have."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    metrics = plotted_metrics(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    fractions = sorted({r["fraction"] for r in rows})
    for ax, metric in zip(axes[0], metrics):
        for experiment in sorted({r["experiment"] for r in rows}):
            mine = sorted((r for r in rows if r["experiment"] == experiment), key=lambda r: r["fraction"])
            for split, style in (("val", "-o"), ("test", "--s")):
                key = f"{split}/{metric}"
                points = [(r["fraction"], *r[key]) for r in mine if key in r]
                if points:
                    x, mean, std = zip(*points)
                    ax.errorbar(x, mean, yerr=std, fmt=style, capsize=3, label=f"{experiment} ({split})")
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # "20", not "2x10^1"
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("labeled images (%)")
        ax.set_ylabel({"mae": "MAE (lower is better)", "iou_c": "Mean IoU_C (higher is better)"}[metric])
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Write `figure(rows)` (MAE and Mean IoU_C, val and test where present, against label fraction,
    one line per experiment) as a PNG."""
    import matplotlib.pyplot as plt

    from crowdseg.io import atomic_path

    fig = figure(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    """Entry point of `crowdseg report`; a bad run directory raises `CrowdsegError` for `crowdseg.cli`."""
    parser = argparse.ArgumentParser(prog="crowdseg report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run directories, or folders holding them")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="read the runs of a wandb project")
    parser.add_argument("--out", default="report.png", help="PNG plot path (default: report.png)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at-step", type=int, default=None, metavar="N",
                      help="val metrics of every run's validation after N optimizer steps")
    when.add_argument("--best", default=None, metavar="KEY", help="val metrics of each run's validation with the lowest KEY")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.wandb):
        parser.error("give run directories or --wandb ENTITY/PROJECT")
    if args.wandb and (args.at_step is not None or args.best):
        parser.error("--at-step and --best read run directories, not --wandb")
    facts = wandb_facts(args.wandb) if args.wandb else [run_facts(p) for p in find_runs(args.runs)]
    if args.at_step is not None:
        facts = [at_step(f, args.at_step) for f in facts]
    elif args.best:
        facts = [at_best(f, args.best) for f in facts]
    rows = summarise(facts)
    print(format_table(rows))
    print(f"plot: {plot(rows, Path(args.out))}")
    if args.json:
        from crowdseg.io import write_json_atomic
        write_json_atomic(args.json, rows)
    return 0


__all__ = ["run_facts", "val_history", "at_step", "at_best", "find_runs", "summarise", "format_table", "plotted_metrics", "figure", "plot", "mean_std",
           "main"]
