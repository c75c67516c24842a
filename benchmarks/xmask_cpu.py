"""XMask's semi-supervised counting against its controls on real crowds, on a CPU (issue 18; docs/xmask.md).

Per seed, with the framework's own commands (a killed script resumes its runs when rerun):
1. stage 1, `<d>_cpu_warmup.yaml`: the supervised start (labeled images only, 1600 steps);
2. from its last.ckpt, the same 800 steps and validation grid for every arm:
   - semi:       `<d>_cpu.yaml`              the teacher's targets on the unlabeled images (XMask);
   - supervised: `<d>_cpu_supervised.yaml`   the control, labeled images only;
   - oracle:     `<d>_cpu_oracle.yaml`       the unlabeled images' true points (an upper bound of the branch);
   - full:       the control with every image labeled (the far end of the gap);
   - semi_weak / oracle_weak: semi and oracle with the strong view made weak (no colour, blur or cutout),
                 a diagnostic of the strong augmentation, in their own experiment folders.
`--summary` compares the arms at the last step of the grid and at each run's best validation of the
monitored metric (the teacher's val MAE), as `crowdseg report --at-step / --best` do, with the
mean-count baseline; how much of the gap between the control and the full run the semi-supervised
run closes; it writes benchmarks/results/xmask_<d>_cpu.json and, with --figure, the val curves.

    OMP_NUM_THREADS=1 python benchmarks/xmask_cpu.py --dataset shb --seeds 0 1 2 --arms semi supervised
    python benchmarks/xmask_cpu.py --dataset shb --summary --figure docs/figures/xmask_shb_cpu.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_runs import ROOT, crowdseg, plot_over_seeds, save_figure, write_results

EXPERIMENTS = ROOT / "experiments" / "xmask"
ARMS = ("semi", "supervised", "oracle", "full", "semi_weak", "oracle_weak")
LABEL = {"semi": "XMask (teacher targets)", "supervised": "supervised control", "oracle": "oracle (true points)",
         "full": "100 % labeled", "warmup": "stage 1 (supervised start)",
         "semi_weak": "XMask, no strong augmentation", "oracle_weak": "oracle, no strong augmentation"}
WEAK_ONLY = ["xmask.strong=none", "xmask.cutout=false"]
MONITOR = "val/teacher_mae"
ALL_LABELED = {"shb": "data.label_fraction=100", "sha": "data.labeled_list=null"}


def arm_command(dataset: str, arm: str) -> list[str]:
    """The experiment and overrides of an arm (seed and runs_root aside)."""
    name = {"semi": "cpu", "supervised": "cpu_supervised", "oracle": "cpu_oracle", "full": "cpu_supervised",
            "warmup": "cpu_warmup", "semi_weak": "cpu", "oracle_weak": "cpu_oracle"}[arm]
    extra = {"full": [ALL_LABELED[dataset]], "semi_weak": [f"name=xmask/{dataset}_cpu_clean", *WEAK_ONLY],
             "oracle_weak": [f"name=xmask/{dataset}_cpu_oracle_clean", *WEAK_ONLY]}.get(arm, [])
    return [str(EXPERIMENTS / f"{dataset}_{name}.yaml"), *extra]


def experiment_folder(dataset: str, arm: str) -> str:
    """Where an arm's runs land under runs_root: its `name=` override, else the experiment's name."""
    names = [a.split("=", 1)[1] for a in arm_command(dataset, arm) if a.startswith("name=")]
    return names[0] if names else f"xmask/{Path(arm_command(dataset, arm)[0]).stem}"


def arm_runs(dataset: str, arm: str, out: Path) -> list[Path]:
    """The run directories of an arm under `out` (every seed), found by their recorded settings."""
    import yaml

    experiment = experiment_folder(dataset, arm)
    runs = []
    for config in sorted((out / experiment).glob("*/config.yaml")):
        cfg = yaml.safe_load(config.read_text())
        all_labeled = (cfg["labels"].get("unlabeled_images") or 0) == 0
        if all_labeled == (arm == "full") and (config.parent / "csv" / "metrics.csv").is_file():
            runs.append(config.parent)
    return runs


def curves(runs: list[Path]) -> dict[int, dict[int, dict[str, float]]]:
    """{seed: {step: val metrics}} of runs."""
    import yaml

    from crowdseg.report import val_history

    return {int(yaml.safe_load((r / "config.yaml").read_text())["seed"]): val_history(r) for r in runs}


def compare(dataset: str, out: Path) -> dict:
    """Per arm and seed, the val metrics at the grid's last step and at the best teacher validation;
    mean +- std over seeds; the gap and the share of it the semi-supervised arm closes."""
    from crowdseg.report import mean_std

    keys = ("val/teacher_mae", "val/mae", "val/teacher_rmse", "val/unlabeled_teacher_count_mae")
    arms = {}
    for arm in ("warmup", *ARMS):
        history = curves(arm_runs(dataset, arm, out))
        if not history:
            continue
        last = max(min(max(h) for h in history.values()), 0)  # the last step every seed reached
        best = {seed: min(h, key=lambda s: (h[s].get(MONITOR, float("inf")), s)) for seed, h in history.items()}
        arms[arm] = {
            "seeds": sorted(history), "last_step": last,
            "at_last_step": {k: mean_std([h[last][k] for h in history.values() if k in h.get(last, {})])
                             for k in keys if all(k in h.get(last, {}) for h in history.values())},
            "at_best": {k: mean_std([history[s][best[s]][k] for s in history]) for k in keys
                        if all(k in history[s][best[s]] for s in history)},
            "best_steps": [best[s] for s in sorted(history)],
            "per_seed_last": {str(s): {k: h[last][k] for k in keys if k in h.get(last, {})} for s, h in history.items()},
            "curve": {str(s): {str(step): m.get(MONITOR) for step, m in sorted(h.items())} for s, h in history.items()},
        }
    result = {"dataset": dataset, "monitor": MONITOR, "arms": arms, "baseline_val_mae": baseline(dataset, out)}
    if {"semi", "supervised", "full"} <= arms.keys():
        for when in ("at_last_step", "at_best"):
            control, full, semi = (arms[a][when][MONITOR][0] for a in ("supervised", "full", "semi"))
            spread = max(arms["semi"][when][MONITOR][1], arms["supervised"][when][MONITOR][1])
            # the issue's precondition: the 100 % run beats the control by more than 3x the seeds' spread
            real = control - full > 3 * spread
            result[f"gap_{when}"] = {"control_minus_full": control - full, "control_minus_semi": control - semi,
                                     "seed_spread": spread, "gap_is_real": real,
                                     "share_closed": (control - semi) / (control - full) if real else None}
    return result


def baseline(dataset: str, out: Path) -> float | None:
    """The mean-count predictor's val MAE, recorded by the stage-1 runs."""
    import json

    for run in arm_runs(dataset, "warmup", out):
        path = run / "metrics" / "val.json"
        if path.is_file():
            return json.loads(path.read_text())["metrics"].get("val/mae_mean_baseline")
    return None


def table(result: dict) -> str:
    """Markdown: teacher val MAE mean +- std per arm, at the grid's last step and at the best validation."""
    lines = ["| arm | seeds | val MAE, teacher, last step | val MAE, teacher, best validation (step) | val MAE, student, last step |",
             "|---|---|---:|---:|---:|"]
    for arm, facts in result["arms"].items():
        cells = []
        for when, key in (("at_last_step", MONITOR), ("at_best", MONITOR), ("at_last_step", "val/mae")):
            mean, std = facts[when].get(key, (float("nan"), 0.0))
            cells.append(f"{mean:.1f} ± {std:.1f}")
        cells[1] += f" ({'/'.join(map(str, facts['best_steps']))})"
        lines.append(f"| {LABEL[arm]} | {','.join(map(str, facts['seeds']))} | " + " | ".join(cells) + " |")
    if result["baseline_val_mae"] is not None:
        lines.append(f"| mean-count baseline | - | {result['baseline_val_mae']:.1f} | | |")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Teacher val MAE against optimizer steps of stage 2, one line per arm (mean over seeds, band = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, facts in result["arms"].items():
        if arm != "warmup":
            plot_over_seeds(ax, facts["curve"], f"{LABEL[arm]} (n={len(facts['seeds'])})")
    if "warmup" in result["arms"]:
        start = result["arms"]["warmup"]["at_last_step"][MONITOR][0]
        ax.axhline(start, color="grey", ls=":", label=f"stage-1 end ({start:.1f})")
    if result["baseline_val_mae"] is not None:
        ax.axhline(result["baseline_val_mae"], color="black", ls="--", lw=1,
                   label=f"mean-count baseline ({result['baseline_val_mae']:.1f})")
    ax.set_xlabel("optimizer steps after the supervised start")
    ax.set_ylabel("val MAE of the EMA teacher (lower is better)")
    ax.set_title(f"XMask phase 1 on {result['dataset'].upper()}, resnet18 from scratch, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("shb", "sha"), default="shb")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:4]),
                        help="the arms to train (default: the four of the comparison)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs", help="runs_root of the runs")
    parser.add_argument("--summary", action="store_true", help="only summarise the runs found under --out")
    parser.add_argument("--figure", type=Path, default=None, help="also write the val curves here (PNG)")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.summary:
        for seed in args.seeds:
            common = [f"seed={seed}", f"runs_root={out}"]
            crowdseg("xmask_cpu", "fit", *arm_command(args.dataset, "warmup"), *common)
            for arm in args.arms:
                crowdseg("xmask_cpu", "fit", *arm_command(args.dataset, arm), *common)
    result = compare(args.dataset, out)
    result["table"] = table(result).splitlines()
    write_results(ROOT / "benchmarks" / "results" / f"xmask_{args.dataset}_cpu.json", result,
                  len(result["arms"]), out)
    print("\n".join(result["table"]))
    for when in ("at_last_step", "at_best"):
        if f"gap_{when}" in result:
            print(f"gap {when}: {result[f'gap_{when}']}")
    if args.figure is not None:
        figure(result, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
