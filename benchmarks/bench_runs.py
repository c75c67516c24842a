"""What the benchmark scripts that train share (boxinst_synthetic.py, boxinst_coco_persons.py,
xmask_cpu.py): run the framework's own commands as children, so a killed script resumes its runs
when rerun, and read the recorded metrics of runs named `<arm>_seed<N>`."""
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
