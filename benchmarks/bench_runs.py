"""What the benchmark scripts that train share (boxinst_synthetic.py, boxinst_coco_persons.py,
xmask_cpu.py, shb_cpu.py): run the framework's own commands as children, so a killed script resumes its
runs when rerun, read the recorded metrics of runs named `<arm>_seed<N>`, and plot val curves over seeds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]


def crowdseg(script: str, *args: str | Path) -> None:
    """Run `crowdseg <args>` from the repository root; a failure ends `script` with one line (the
    command has printed its own error)."""
    command = [sys.executable, "-m", "crowdseg", *map(str, args)]
    print("+", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"})
    if done.returncode != 0:
        raise SystemExit(f"{script}: `crowdseg {' '.join(command[3:5])}` failed (exit {done.returncode}); "
                         f"rerun to resume")


def fit_and_test(script: str, experiment: Path, run_name: str, seed: int, out: Path, overrides: Iterable[str]) -> None:
    """`crowdseg fit`, then `crowdseg test` of its val-selected best.ckpt, of one named run under `out`."""
    args = [experiment, f"seed={seed}", f"runs_root={out}", f"run_name={run_name}", *overrides]
    crowdseg(script, "fit", *args)
    crowdseg(script, "test", *args)


def seed_of(run: Path) -> int:
    return int(run.name.rsplit("seed", 1)[1])


def seed_metrics(runs: Iterable[Path], stage: str) -> dict[int, dict[str, float]]:
    """{seed: {metric without its `<split>/` prefix: value}} of the `runs` (`...seed<N>` folders) that
    have a `metrics/<stage>.json`."""
    found = {}
    for run in sorted(runs):
        path = run / "metrics" / f"{stage}.json"
        if path.is_file():
            found[seed_of(run)] = {k.split("/", 1)[1]: v for k, v in json.loads(path.read_text())["metrics"].items()}
    return found


def write_results(path: Path, results: dict, runs_found: int, out: Path) -> None:
    """Write a script's results JSON (atomically); with no run found under `out` it refuses rather than
    overwrite the published numbers with an empty table."""
    from crowdseg.io import write_text_atomic

    if not runs_found:
        raise SystemExit(f"no finished runs under {out}: {path.relative_to(ROOT)} left as it is (pass --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1))


def plot_over_seeds(ax, curves: dict[str, dict[str, float]], label: str, ms: float = 3) -> None:
    """One line of the mean over seeds of `curves` ({seed: {step: value}}) at the steps every seed has,
    with the seeds' standard deviation as a band."""
    import statistics

    steps = sorted(set.intersection(*({int(s) for s in c} for c in curves.values())))
    values = [[c[str(s)] for c in curves.values()] for s in steps]
    mean = [statistics.mean(v) for v in values]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    line, = ax.plot(steps, mean, "-o", ms=ms, label=label)
    ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                    color=line.get_color(), alpha=0.15)


def save_figure(fig, path: Path) -> None:
    """Write `fig` to `path` (PNG) atomically and close it."""
    import matplotlib.pyplot as plt

    from crowdseg.io import atomic_path

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
