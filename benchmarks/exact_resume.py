"""Exact continuation: kill -9 a training run at three points, rerun the same command, and compare the
final weights and the final validation MAE with an uninterrupted run of the same seed (CPU).

Cases: the synthetic p2p experiment (experiments/p2p/synthetic.yaml) in one process (2 DataLoader
workers), and the same experiment as a 2-process DDP run (`trainer.devices=2 trainer.strategy=ddp`,
gloo, no workers), both made small by the overrides below (4 training steps per epoch, 3 epochs,
validation every epoch, `last.ckpt` every 3 steps and at every epoch end).

Kill points (the kill tests' own hooks, tests/kill_child.py):
- mid-epoch: SIGKILL after training step 7 (last.ckpt is the step-6 one, two batches into epoch 2);
- validation: SIGKILL inside the validation after step 8 (after its first batch);
- checkpoint write: SIGKILL during the step-9 checkpoint write, with half of it in the temporary file
  and before that file would replace last.ckpt (the step-8 last.ckpt must survive).
Each command runs in its own process group; after the kill the group is SIGKILLed as a job scheduler
would (under DDP the hook kills each rank itself, except in the checkpoint write, which only rank 0
does). Then the same command is rerun to the end.

Reported per case and kill point: the step the rerun resumed from, whether the kill left a partial
temporary checkpoint, the max abs difference over every tensor of the final last.ckpt's state_dict
vs. the uninterrupted run's, and the final val MAE of both (metrics/val.json).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exact_resume.py [--cases single ddp]
       [--out benchmarks/results/exact_resume.json] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "p2p" / "synthetic.yaml"

SMALL = ["model.backbone=resnet10t", "model.fpn_channels=64", "model.head_channels=64",
         "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.num_test=8",
         "data.synthetic.height=96", "data.synthetic.width=96", "data.crop_size=64", "data.batch_size=8",
         "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1", "checkpoint_every_n_steps=3",
         "optim.step_size=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
         "logger.wandb.mode=disabled"]
CASES = {"single": ["data.num_workers=2"],
         "ddp": ["data.num_workers=0", "trainer.devices=2", "trainer.strategy=ddp"]}
# (name, kill point, step): the child SIGKILLs itself there (tests/kill_child.py)
KILLS = [("mid-epoch (after step 7)", "train", 7), ("validation (after step 8)", "validation", 8),
         ("checkpoint write (step 9)", "checkpoint_write", 9)]


def run(overrides: list[str], kill: Optional[tuple[str, int]] = None, timeout: float = 900) -> tuple[int, str]:
    """Run `crowdseg fit` (with `kill`, tests/kill_child.py) in its own process group; SIGKILL what is
    left of the group afterwards."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    args = [str(EXPERIMENT), *overrides]
    command = ([sys.executable, str(ROOT / "tests" / "kill_child.py"), kill[0], str(kill[1]), *args] if kill
               else [sys.executable, "-m", "crowdseg", "fit", *args])
    proc = subprocess.Popen(command, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the other rank of a killed DDP job
        except ProcessLookupError:
            pass
    return proc.returncode, out


def run_dir(runs_root: Path) -> Path:
    found = sorted(runs_root.glob("p2p/synthetic/*"))
    assert len(found) == 1, found
    return found[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def final_mae(run: Path) -> float:
    return float(json.loads((run / "metrics" / "val.json").read_text())["metrics"]["val/mae"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "exact_resume.json"))
    parser.add_argument("--keep", default=None, help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="exact_resume_"))
    rows, started = [], time.time()
    try:
        for case in args.cases:
            overrides = SMALL + CASES[case]
            root = work / case / "uninterrupted"
            t0 = time.time()
            rc, out = run(overrides + [f"runs_root={root}"])
            if rc != 0:
                raise SystemExit(f"{case} uninterrupted run failed ({rc}):\n{out[-3000:]}")
            ref_run = run_dir(root)
            ref = load(ref_run / "checkpoints" / "last.ckpt")
            ref_mae = final_mae(ref_run)
            print(f"[{case}] uninterrupted: step {ref['global_step']}, val MAE {ref_mae:.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
            for name, point, step in KILLS:
                root = work / case / point
                command = overrides + [f"runs_root={root}"]
                rc, out = run(command, (point, step))
                if rc != -signal.SIGKILL:
                    raise SystemExit(f"{case} / {name}: expected a SIGKILL, got {rc}:\n{out[-3000:]}")
                run_path = run_dir(root)
                resumed_from = int(load(run_path / "checkpoints" / "last.ckpt")["global_step"])
                partial = sorted(p.name for p in (run_path / "checkpoints").glob(".*.tmp*"))
                rc, out = run(command)
                if rc != 0:
                    raise SystemExit(f"{case} / {name}: the rerun failed ({rc}):\n{out[-3000:]}")
                final = load(run_path / "checkpoints" / "last.ckpt")
                row = {"case": case, "kill": name, "resumed_from_step": resumed_from, "partial_tmp_left": bool(partial),
                       "tmp_after_rerun": bool(list((run_path / "checkpoints").glob(".*.tmp*"))),
                       "final_step": int(final["global_step"]), "reference_step": int(ref["global_step"]),
                       "max_abs_weight_diff": max_abs_diff(final["state_dict"], ref["state_dict"]),
                       "val_mae_resumed": final_mae(run_path), "val_mae_uninterrupted": ref_mae}
                rows.append(row)
                print(f"[{case}] {name}: resumed from step {resumed_from}, max abs diff "
                      f"{row['max_abs_weight_diff']:.3g}, val MAE {row['val_mae_resumed']:.4f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    header = "| case | kill -9 | resumed from step | max abs weight diff vs. uninterrupted | final val MAE (resumed / uninterrupted) |"
    print("\n" + header + "\n|---|---|---|---|---|")
    for r in rows:
        label = "1 process, 2 workers" if r["case"] == "single" else "2-process DDP (gloo)"
        note = " (partial .tmp left, old last.ckpt kept)" if r["partial_tmp_left"] else ""
        print(f"| {label} | {r['kill']} | {r['resumed_from_step']}{note} | {r['max_abs_weight_diff']:.3g} | "
              f"{r['val_mae_resumed']:.4f} / {r['val_mae_uninterrupted']:.4f} |")
    total = time.time() - started
    print(f"\n{len(rows)} kills, {total / 60:.1f} min, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    record = {"benchmark": "exact_resume", "overrides": SMALL, "cases": {k: CASES[k] for k in args.cases},
              "rows": rows, "seconds": round(total, 1), "torch": torch.__version__, "python": platform.python_version(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
