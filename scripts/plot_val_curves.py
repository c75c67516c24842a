"""Validation curves of crowdseg runs (their `csv/metrics.csv`) side by side.

  python scripts/plot_val_curves.py --out docs/figures/shb_cpu_val.png --baseline 76.05 \
      "density=runs/density/shb_cpu/density-shb-lf100-s0" "p2p=runs/p2p/shb_cpu/p2p-shb-lf100-s0"

Left: val MAE against the training step (the dashed line: the mean-count baseline, `--baseline`);
right: localization F1 at 8 px (`val/sigma_l_f1`) for the runs that log it.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def val_rows(run: Path) -> list[dict[str, float]]:
    """The validation rows of a run's metrics CSV: {"step", "val/..."} as floats."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"plot_val_curves: {path}: no metrics CSV (is {run} a run directory?)")
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("val/mae"):
                rows.append({k: float(v) for k, v in row.items() if v and (k == "step" or k.startswith("val/"))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="label=run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", type=float, default=None, help="val MAE of the mean-count predictor")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    fig, (ax_mae, ax_f1) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in args.runs:
        label, _, path = spec.partition("=")
        rows = val_rows(Path(path))
        steps = [r["step"] + 1 for r in rows]
        ax_mae.plot(steps, [r["val/mae"] for r in rows], marker="o", label=label)
        if any("val/sigma_l_f1" in r for r in rows):
            ax_f1.plot(steps, [r.get("val/sigma_l_f1", float("nan")) for r in rows], marker="o", label=label)
    if args.baseline is not None:
        ax_mae.axhline(args.baseline, color="gray", linestyle="--", label="mean-count baseline")
    ax_mae.set(xlabel="step", ylabel="val MAE", ylim=(0, None))
    ax_f1.set(xlabel="step", ylabel="val F1 at 8 px", ylim=(0, 1))
    for ax in (ax_mae, ax_f1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
