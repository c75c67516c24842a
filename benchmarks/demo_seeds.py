"""The demo over seeds: `crowdseg fit experiments/p2p/synthetic.yaml seed=S` for seeds 0-4, each timed,
with the validation MAE it prints, the mean-count baseline beside it and the localization F1.

The README quotes the range over seeds from the JSON this writes; rerun it after any change that can
move the demo's numbers (model, losses, data, schedule, the demo's YAML). Runs live under a temporary
runs root (or `--runs-root`, where a rerun resumes and so re-reads finished seeds), one at a time, so a
run's wall time is the demo's own.

Usage: .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2 3 4] [--experiment FILE]
       [--out benchmarks/results/demo_seeds.json] [--runs-root DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(experiment: str, seed: int, runs_root: Path, overrides: list[str]) -> dict:
    """Fit one seed through the CLI; its final val metrics (metrics/val.json) and wall time."""
    command = [sys.executable, "-m", "crowdseg", "fit", experiment, f"seed={seed}", f"runs_root={runs_root}",
               "trainer.enable_progress_bar=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: `{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
    run_dir = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.strip().startswith("run_dir:"))
    metrics = json.loads((Path(run_dir) / "metrics" / "val.json").read_text())["metrics"]
    mae, baseline = metrics["val/mae"], metrics["val/mae_mean_baseline"]
    return {"seed": seed, "val_mae": mae, "mean_count_baseline": baseline,
            "reduction_pct": 100 * (1 - mae / baseline), "f1_8px": metrics.get("val/sigma_l_f1"),
            "f1_4px": metrics.get("val/sigma_s_f1"), "wall_s": round(wall, 1), "run_dir": run_dir}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--experiment", default="experiments/p2p/synthetic.yaml")
    parser.add_argument("--out", default="benchmarks/results/demo_seeds.json")
    parser.add_argument("--runs-root", default=None, help="keep the runs here (default: a temporary folder)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key=value, anywhere on the line
    args = parser.parse_args([a for a in argv if a not in overrides])
    with tempfile.TemporaryDirectory() as tmp:
        runs_root = Path(args.runs_root or tmp).resolve()
        rows = []
        for seed in args.seeds:
            rows.append(run_seed(args.experiment, seed, runs_root, overrides))
            r = rows[-1]
            print(f"seed {seed}: val MAE {r['val_mae']:.2f} vs. {r['mean_count_baseline']:.2f} baseline "
                  f"({r['reduction_pct']:.0f} % lower), F1@8px {r['f1_8px']:.3f}, {r['wall_s'] / 60:.1f} min", flush=True)
    reductions = [r["reduction_pct"] for r in rows]
    result = {"experiment": args.experiment, "overrides": overrides, "seeds": rows,
              "reduction_pct_min": min(reductions), "reduction_pct_max": max(reductions),
              "val_mae_range": [min(r["val_mae"] for r in rows), max(r["val_mae"] for r in rows)],
              "wall_s_max": max(r["wall_s"] for r in rows),
              "machine": {"cpus": os.cpu_count(), "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
                          "platform": platform.platform()}}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"val MAE {result['val_mae_range'][0]:.2f}-{result['val_mae_range'][1]:.2f}, "
          f"{min(reductions):.0f}-{max(reductions):.0f} % below the mean-count baseline over seeds {args.seeds}; "
          f"slowest run {result['wall_s_max'] / 60:.1f} min; {out}")


if __name__ == "__main__":
    main()
