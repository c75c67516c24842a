"""The BoxInst "must show" experiment on the occlusion-heavy synthetic crowd (docs/boxinst.md).

Per seed, with the framework's own commands (so a killed run resumes when the script is rerun):
1. `crowdseg fit experiments/boxinst/synthetic.yaml` from boxes only, then `crowdseg test` of its
   val-selected best.ckpt: the predicted masks' AP and, from the same detections, the box baseline
   (each detected box filled as its mask, `test/boxfill_*`);
2. two fine-tunes of the base run's final weights for the same steps: with OverlapLoss
   (synthetic_overlap.yaml) and without it (synthetic_finetune.yaml), each tested at its best.ckpt.
`--summary` prints mean +- std over the seeds found under `--out` as a Markdown table; the per-seed
test metrics and the table are written to benchmarks/results/boxinst_synthetic.json.

    OMP_NUM_THREADS=2 python benchmarks/boxinst_synthetic.py --seeds 0 1 2
    python benchmarks/boxinst_synthetic.py --summary
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench_runs import ROOT, fit_and_test, seed_metrics, write_results

EXPERIMENTS = ROOT / "experiments" / "boxinst"
RESULTS = ROOT / "benchmarks" / "results" / "boxinst_synthetic.json"
KEYS = ("mask_ap", "mask_ap50", "mask_ap75", "overlap", "box_ap50", "detections")
ROWS = (("BoxInst, boxes only", "synthetic", "mask_"),
        ("box baseline: each detected box filled", "synthetic", "boxfill_mask_"),
        ("fine-tune, no OverlapLoss", "synthetic_finetune", "mask_"),
        ("fine-tune + OverlapLoss", "synthetic_overlap", "mask_"))


def run_dir(out: Path, experiment: str, seed: int | str) -> Path:
    """Where `crowdseg fit` puts a run of this script (seed "*": the glob pattern of all seeds)."""
    return out / "boxinst" / experiment / f"{experiment}_seed{seed}"


def train_and_test(experiment: str, seed: int, out: Path, overrides: list[str]) -> None:
    fit_and_test("boxinst_synthetic", EXPERIMENTS / f"{experiment}.yaml", f"{experiment}_seed{seed}", seed, out,
                 overrides)


def test_metrics(out: Path, experiment: str) -> dict[int, dict[str, float]]:
    """{seed: {metric: value}} of the runs of `experiment` under `out` that have been tested."""
    return seed_metrics(out.glob(str(run_dir(Path(), experiment, "*"))), "test")


def summary(out: Path) -> str:
    """Markdown table: mean +- std over the seeds whose test metrics exist, per row of ROWS."""
    lines = ["| run | seeds | " + " | ".join(KEYS) + " |", "|---|---:|" + "---:|" * len(KEYS)]
    for label, experiment, prefix in ROWS:
        found = test_metrics(out, experiment)
        if not found:
            continue
        cells = []
        for key in KEYS:
            if key in ("overlap", "box_ap50", "detections") and prefix == "boxfill_mask_":
                cells.append("")  # the same detections as the row above; the filled boxes' overlap is not measured
                continue
            name = prefix + key[len("mask_"):] if key.startswith("mask_") else key
            values = [m[name] for m in found.values() if name in m]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +- {std:.3f}")
        lines.append(f"| {label} | {','.join(map(str, sorted(found)))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def val_curves(out: Path, path: Path) -> None:
    """Val mask AP50 / AP of the base runs against the step, their box baseline dashed: one line per seed."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    base_runs = sorted(out.glob(str(run_dir(Path(), "synthetic", "*") / "csv" / "metrics.csv")))
    for number, csv_path in enumerate(base_runs):
        seed = csv_path.parent.parent.name.rsplit("seed", 1)[1]
        with open(csv_path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/mask_ap") and r.get("val/boxfill_mask_ap")]
        steps = [int(r["step"]) + 1 for r in rows]
        for ax, key in zip(axes, ("mask_ap50", "mask_ap")):
            color = f"C{number}"
            ax.plot(steps, [float(r[f"val/{key}"]) for r in rows], color=color, label=f"masks, seed {seed}")
            ax.plot(steps, [float(r[f"val/boxfill_{key}"]) for r in rows], color=color, ls="--",
                    label=f"filled boxes, seed {seed}")
    for ax, title in zip(axes, ("val mask AP50", "val mask AP (0.5:0.95)")):
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("BoxInst from boxes on the occluded synthetic crowd: masks vs. the same detections' filled boxes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "boxinst_synthetic", help="runs_root of every run")
    parser.add_argument("--summary", action="store_true", help="print the table of the runs under --out and stop")
    parser.add_argument("--figure", type=Path, default=None, help="also plot the base runs' val curves to this PNG")
    parser.add_argument("--only", choices=("base", "finetune"), default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run (e.g. a quick check: "
                                                     "trainer.max_steps=2 data.synthetic.num_test=2)")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.summary:
        for seed in args.seeds:
            if args.only != "finetune":
                train_and_test("synthetic", seed, out, args.overrides)
            if args.only != "base":
                base = run_dir(out, "synthetic", seed) / "checkpoints" / "last.ckpt"
                for experiment in ("synthetic_overlap", "synthetic_finetune"):
                    train_and_test(experiment, seed, out, [*args.overrides, f"boxinst.init_ckpt={base}"])
    table = summary(out)
    per_seed = {f"{experiment}_seed{seed}": metrics for experiment in dict.fromkeys(row[1] for row in ROWS)
                for seed, metrics in test_metrics(out, experiment).items()}
    write_results(RESULTS, {"table": table.splitlines(), "test_metrics": per_seed}, len(per_seed), out)
    print(table)
    if args.figure is not None:
        val_curves(out, args.figure)


if __name__ == "__main__":
    sys.exit(main())
