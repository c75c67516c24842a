"""Plot validation curves of `scripts/real_crowd.py` runs (JSON lines) side by side.

  python scripts/plot_real_crowd.py --out docs/figures/p2p_shb_val.png \
      "baseline=runs/diag/A.jsonl" "fix=runs/diag/R1.jsonl"

Panels: val MAE (with the mean-count baseline), localization F1 at 8 px and 4 px (p2p), the mean
of the highest person score per image and around each GT head (p2p). Solid: live weights;
dashed: EMA weights, where the run had them.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str) -> tuple[dict, list[dict]]:
    config, vals = {}, []
    for line in open(path):
        record = json.loads(line)
        if record["kind"] == "config":
            config = record
        elif record["kind"] == "val":
            vals.append(record)
    return config, vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="label=path.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--x", choices=("step", "epoch"), default="step")
    args = ap.parse_args(argv)
    runs = [(r.split("=", 1)[0], *read(r.split("=", 1)[1])) for r in args.runs]
    p2p = any("f1_8" in v for _, _, vals in runs for v in vals)
    panels = [("mae", "val MAE")] + ([("f1_8", "F1 @ 8 px"), ("f1_4", "F1 @ 4 px"),
                                       ("gt_local_max", "best score within 8 px of a head")] if p2p else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (label, config, vals) in enumerate(runs):
            color = f"C{i}"
            xs = [v[args.x] for v in vals]
            ax.plot(xs, [v.get(key, float("nan")) for v in vals], "-o", ms=3, color=color, label=label)
            if any(f"ema_{key}" in v for v in vals):
                ax.plot(xs, [v.get(f"ema_{key}", float("nan")) for v in vals], "--", color=color, label=f"{label} (EMA)")
            if key == "mae" and i == 0 and "val_mean_count_baseline_mae" in config:
                ax.axhline(config["val_mean_count_baseline_mae"], color="gray", lw=1, ls=":", label="mean-count baseline")
        ax.set_title(title)
        ax.set_xlabel(args.x)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
