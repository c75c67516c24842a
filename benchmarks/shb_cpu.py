"""The ShanghaiTech B CPU recipes over seeds (issue 22; docs/p2p_real_data.md, the README's table).

Trains `experiments/{p2p,density}/shb_cpu.yaml` for each seed with the framework's own command (a killed
script resumes its runs when rerun), then summarises the runs of exactly the recipes' settings found
under --out (sweep runs with other settings sit beside them in their own run directories and are left
out): per model, val MAE at each run's best validation (the one best.ckpt holds) and at its last step,
the point predictor's F1 at 8 px on the loaded images and in original-image pixels, mean +- std over
seeds, with the mean-count baseline; it writes benchmarks/results/shb_cpu.json and, with --figure, the
val curves (mean over seeds, std as a band).

    OMP_NUM_THREADS=2 python benchmarks/shb_cpu.py --seeds 0 1 2
    python benchmarks/shb_cpu.py --summary --out runs --figure docs/figures/shb_cpu_val.png --calibrated
    python benchmarks/shb_cpu.py --dataset sha --summary --out runs --figure docs/figures/sha_cpu_val.png --calibrated

--calibrated also validates each point predictor's last.ckpt at the score threshold 1 / (1 + eos_coef)
(`calibrated_last`), with `crowdseg validate`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_runs import ROOT, crowdseg, plot_over_seeds, save_figure, write_results
from crowdseg.report import mean_std

MODELS = {"p2p": "point predictor", "density": "density counter"}
KEYS = ("val/mae", "val/rmse", "val/sigma_l_f1", "val/orig_sigma_l_f1", "val/orig_sigma_s_f1")


def recipe(model: str, dataset: str) -> Path:
    return ROOT / "experiments" / model / f"{dataset}_cpu.yaml"


def recipe_runs(model: str, dataset: str, seeds: list[int], out: Path) -> dict[int, Path]:
    """{seed: run directory} of the runs under `out` that hold the recipe's own settings."""
    from crowdseg.config import load_config
    from crowdseg.runs import changed_settings, run_dir

    found = {}
    for seed in seeds:
        cfg = load_config(recipe(model, dataset), [f"seed={seed}", f"runs_root={out}"])
        path = run_dir(cfg)
        if (path / "csv" / "metrics.csv").is_file() and not changed_settings(path, cfg):
            found[seed] = path
    return found


def summarise(model: str, runs: dict[int, Path]) -> dict:
    """Per seed and over seeds: the validation with the lowest val MAE and the last validation."""
    import json

    from crowdseg.report import val_history

    histories = {seed: val_history(run) for seed, run in runs.items()}
    per_seed = {}
    for seed, history in histories.items():
        best = min(history, key=lambda s: (history[s]["val/mae"], s))
        last = max(history)
        per_seed[seed] = {"best_step": best, "last_step": last,
                          "at_best": {k: history[best][k] for k in KEYS if k in history[best]},
                          "at_last": {k: history[last][k] for k in KEYS if k in history[last]}}
    over = {when: {k: mean_std([p[when][k] for p in per_seed.values()]) for k in KEYS
                   if all(k in p[when] for p in per_seed.values())} for when in ("at_best", "at_last")}
    record = json.loads((next(iter(runs.values())) / "metrics" / "val.json").read_text())
    return {"model": MODELS[model], "seeds": sorted(runs), "runs": {s: str(r) for s, r in runs.items()},
            "baseline_val_mae": record["metrics"].get("val/mae_mean_baseline"), "per_seed": per_seed, **over,
            "curve": {str(seed): {str(s): m["val/mae"] for s, m in sorted(h.items())} for seed, h in histories.items()}}


def calibrated_last(run: Path) -> dict:
    """The point predictor's val metrics at its last step, decoded at `unweighted_threshold(eos_coef)`
    = 1 / (1 + eos_coef) instead of P2PNet's 0.5: the score above which the person probability exceeds 1/2
    under the weighted cross-entropy (with eos_coef 0.5, 0.5 keeps points with p > 1/3 and the count drifts up
    as the classifier calibrates; docs/p2p_real_data.md). The threshold is derived, not chosen on val."""
    import json

    import yaml

    from crowdseg.losses.p2p import unweighted_threshold

    threshold = round(unweighted_threshold(yaml.safe_load((run / "config.yaml").read_text())["loss"]["eos_coef"]), 4)
    ckpt = run / "checkpoints" / "last.ckpt"
    crowdseg("shb_cpu", "validate", "--ckpt", ckpt, f"loss.score_threshold={threshold}")
    record = json.loads((run / "metrics" / "val.json").read_text())
    crowdseg("shb_cpu", "validate", "--ckpt", ckpt)      # the run's own record has the last word
    return {"score_threshold": threshold, "step": record["step"],
            **{k: record["metrics"][k] for k in KEYS if k in record["metrics"]}}


def table(result: dict) -> str:
    lines = ["| model | seeds | val MAE, best validation | val MAE, last step | val MAE, last step, threshold 1/(1+w) "
             "| F1@8, loaded / original pixels (best) | mean-count baseline |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for facts in result["models"].values():
        cell = lambda when, key, f=".1f": "{:{f}} ± {:{f}}".format(*facts[when][key], f=f) if key in facts[when] else "-"
        f1 = (f"{cell('at_best', 'val/sigma_l_f1', '.3f')} / {cell('at_best', 'val/orig_sigma_l_f1', '.3f')}"
              if "val/sigma_l_f1" in facts["at_best"] else "-")
        lines.append(f"| {facts['model']} | {','.join(map(str, facts['seeds']))} | {cell('at_best', 'val/mae')} "
                     f"({'/'.join(str(p['best_step']) for p in facts['per_seed'].values())}) | "
                     f"{cell('at_last', 'val/mae')} | {cell('calibrated_last', 'val/mae') if 'calibrated_last' in facts else '-'} "
                     f"| {f1} | {facts['baseline_val_mae']:.1f} |")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for facts in result["models"].values():
        plot_over_seeds(ax, facts["curve"], f"{facts['model']} (seeds {len(facts['curve'])})", ms=2)
    baseline = next(iter(result["models"].values()))["baseline_val_mae"]
    ax.axhline(baseline, color="black", ls="--", lw=1, label=f"mean-count baseline ({baseline:.1f})")
    ax.set_ylim(0, baseline * 1.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val MAE, EMA weights (lower is better)")
    ax.set_title(f"{result['dataset'].upper()} CPU recipes, resnet18 from scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("shb", "sha"), default="shb")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs", help="runs_root of the runs")
    parser.add_argument("--summary", action="store_true", help="only summarise the runs found under --out")
    parser.add_argument("--figure", type=Path, default=None, help="also write the val curves here (PNG)")
    parser.add_argument("--calibrated", action="store_true",
                        help="also validate the point predictor's last.ckpt at the score threshold 1 / (1 + eos_coef)")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.summary:
        for seed in args.seeds:
            for model in args.models:
                crowdseg("shb_cpu", "fit", recipe(model, args.dataset), f"seed={seed}", f"runs_root={out}")
    models = {}
    for model in args.models:
        runs = recipe_runs(model, args.dataset, args.seeds, out)
        if not runs:
            continue
        calibrated = {seed: calibrated_last(run) for seed, run in runs.items()} if model == "p2p" and args.calibrated else {}
        models[model] = summarise(model, runs)
        if calibrated:
            models[model]["calibrated_last"] = {"per_seed": calibrated, **{
                k: mean_std([c[k] for c in calibrated.values()]) for k in KEYS if k in calibrated[min(calibrated)]}}
    result = {"dataset": args.dataset, "models": models}
    result["table"] = table(result).splitlines()
    write_results(ROOT / "benchmarks" / "results" / f"{args.dataset}_cpu.json", result, len(models), out)
    print("\n".join(result["table"]))
    if args.figure is not None and models:
        figure(result, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
