"""`crowdseg report`: compare runs across label fractions and seeds (what a team reads after a sweep).

Each run contributes one row of facts: its experiment, method, real label fraction, seed and the
final metrics of `metrics/val.json` and `metrics/test.json` (or, with `--wandb`, a wandb run's
config and summary). Runs are grouped by experiment and label fraction; the table gives mean +- std
over seeds and the number of runs, and a PNG plots MAE and Mean IoU_C against the label fraction,
one line per experiment.

    crowdseg report runs/                       # every run below runs/
    crowdseg report runs/a runs/b --out cmp.png
    crowdseg report --wandb entity/project
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from crowdseg.errors import CrowdsegError, DataError

COLUMNS = ("val/mae", "val/iou_c", "test/mae", "test/iou_c")  # shown when some run has them
PLOTTED = ("mae", "iou_c")


@dataclass
class RunFacts:
    experiment: str
    method: str
    fraction: float
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    where: str = ""


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
    for split in ("val", "test"):
        path = run_dir / "metrics" / f"{split}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            values = record.get("metrics", record)  # older runs wrote the metrics flat
            metrics.update({k: float(v) for k, v in values.items() if isinstance(v, (int, float))})
    return RunFacts(cfg.get("name", run_dir.parent.name), cfg.get("method", "?"), float(fraction),
                    int(cfg.get("seed", 0)), _aliases(metrics), str(run_dir))


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
                              int(cfg.get("seed", 0)), _aliases(metrics), run.url))
    return facts


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(facts: list[RunFacts]) -> list[dict[str, Any]]:
    """One row per (experiment, label fraction): n runs, seeds, and mean / std of every metric."""
    groups: dict[tuple[str, float], list[RunFacts]] = {}
    for f in facts:
        groups.setdefault((f.experiment, round(f.fraction, 3)), []).append(f)
    rows = []
    for (experiment, fraction), runs in sorted(groups.items()):
        row: dict[str, Any] = {"experiment": experiment, "method": runs[0].method, "fraction": fraction,
                               "n": len(runs), "seeds": sorted(r.seed for r in runs)}
        for key in sorted({k for r in runs for k in r.metrics}):
            values = [r.metrics[key] for r in runs if key in r.metrics]
            row[key] = mean_std(values)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    header = ["experiment", "method", "label %", "n", *columns]
    lines = [header]
    for r in rows:
        cells = [r["experiment"], r["method"], f"{r['fraction']:g}", str(r["n"])]
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


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """MAE and Mean IoU_C (val, and test where present) against label fraction, one line per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crowdseg.io import atomic_path

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5.5 * len(PLOTTED), 4))
    for ax, metric in zip(axes, PLOTTED):
        for experiment in sorted({r["experiment"] for r in rows}):
            mine = sorted((r for r in rows if r["experiment"] == experiment), key=lambda r: r["fraction"])
            for split, style in (("val", "-o"), ("test", "--s")):
                key = f"{split}/{metric}"
                points = [(r["fraction"], *r[key]) for r in mine if key in r]
                if points:
                    x, mean, std = zip(*points)
                    ax.errorbar(x, mean, yerr=std, fmt=style, capsize=3, label=f"{experiment} ({split})")
        ax.set_xscale("log")
        ax.set_xlabel("labeled images (%)")
        ax.set_ylabel({"mae": "MAE (lower is better)", "iou_c": "Mean IoU_C (higher is better)"}[metric])
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crowdseg report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run directories, or folders holding them")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="read the runs of a wandb project")
    parser.add_argument("--out", default="report.png", help="PNG plot path (default: report.png)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.wandb):
        parser.error("give run directories or --wandb ENTITY/PROJECT")
    try:
        facts = wandb_facts(args.wandb) if args.wandb else [run_facts(p) for p in find_runs(args.runs)]
        rows = summarise(facts)
        print(format_table(rows))
        print(f"plot: {plot(rows, Path(args.out))}")
        if args.json:
            from crowdseg.io import write_json_atomic
            write_json_atomic(args.json, rows)
    except CrowdsegError as err:
        print(f"crowdseg report: error: {err}")
        return 2
    return 0


__all__ = ["run_facts", "find_runs", "summarise", "format_table", "plot", "mean_std", "main"]
