"""Training images per second of `crowdseg fit` (Lightning) against a bare PyTorch loop doing the same work.

Both ways train the job of one experiment (default `experiments/p2p/synthetic.yaml`, the `make demo`
run): the same model (built from the same seed), the same loss (the job's criterion on the model's
outputs), the same optimizer (the module's `configure_optimizers`) and the same gradient clipping
by norm (`optim.grad_clip`), on the same batches. The two loops:

- lightning: the Trainer `crowdseg fit` builds (`crowdseg.train.build_trainer`: CSV logger,
  `last.ckpt` every `checkpoint_every_n_steps` steps and every epoch, progress bar, logging every
  `trainer.log_every_n_steps`), validation off (it is not training throughput);
- bare: ``for batch in loader: loss = criterion(model(images), points)["loss"]; zero_grad; backward;
  clip; step`` (and the StepLR step per epoch).

Cases (`CASES`):
- demo: the experiment as `crowdseg fit` runs it today, with its own training DataLoader (the job's
  DataModule: dataset, augmentation, batch size, workers, collate), plus that DataLoader iterated
  alone (how fast batches can arrive at all). *Data share*: the fraction of a step's wall time the
  training process waits for the next batch (bare: blocked in ``next(loader)``; Lightning: from one
  step's end to the next step's start, which also holds Lightning's own between-step hooks).
- demo_passive: the same with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of spinning
  when they wait; on a CPU shared with other processes or with the DataLoader workers, spinning
  intra-op threads are what costs most).
- loop: a small model on 32 px crops (`LOOP_OVERRIDES`), batches held in memory, passive OpenMP:
  a step is short and costs no data, so what is left is the training loop's own cost per step
  (what a fast GPU step would see).

Each (case, way) runs in a fresh process, `--repeats` times, interleaved, timed after warm-up steps;
medians are reported, with wall time and the training process's CPU time per step (the CPU time
is much less disturbed by other jobs on a shared machine). The Lightning run also times one
`last.ckpt` write, amortised over `checkpoint_every_n_steps`.

    .venv/bin/python benchmarks/train_loop.py [--steps 10] [--warmup 2] [--loop-steps 60] [--repeats 2]
                                              [key=value ...]

Extra `key=value` arguments are config overrides for every run (e.g. `data.num_workers=0`).
Writes benchmarks/results/train_loop.json. `bare_loss`, `bare_step` and `lightning_losses` are also
what tests/test_train_loop_bench.py checks (the same loss on the same batch, the same step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = ROOT / "experiments" / "p2p" / "synthetic.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "train_loop.json"


# ------------------------------------------------------------------------------------------ the job
def load(experiment: Path, overrides: list[str], runs_root: Path) -> Any:
    from crowdseg.config import load_config
    return load_config(experiment, [f"runs_root={runs_root}", "logger.wandb.mode=disabled", *overrides])


def build(cfg: Any) -> tuple[Any, Path]:
    """The job `crowdseg fit` builds for `cfg` (seeded as `train(cfg)` seeds it) and its run directory."""
    import lightning as L
    from crowdseg.runs import prepare_run_dir
    from crowdseg.train import build_job
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    path = prepare_run_dir(cfg)
    return build_job(cfg, path), path


# ------------------------------------------------------------------------------------ the bare loop
def bare_loss(module: Any, batch: dict) -> torch.Tensor:
    """The training loss of `batch` computed without Lightning: the module's criterion on its model's outputs."""
    return module.criterion(module.model(batch["image"]), batch["points"])["loss"]


def bare_optimizer(module: Any) -> tuple[torch.optim.Optimizer, Optional[Any]]:
    """The module's own optimizer and (epoch-interval) scheduler, as Lightning would configure them."""
    conf = module.configure_optimizers()
    if isinstance(conf, dict):
        scheduler = conf.get("lr_scheduler")
        return conf["optimizer"], scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler
    return conf, None


def bare_step(module: Any, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: Optional[float]) -> float:
    """One training step as Lightning's automatic optimisation does it: loss, zero_grad, backward,
    clip the gradient norm over the optimizer's parameters, step. Returns the loss."""
    loss = bare_loss(module, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------- the Lightning loop
class StepTimer:
    """A Lightning callback: time of every train batch start and end, and the loss of every step."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[float] = []          # process CPU time at each batch end (all threads of this process)
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def lightning_trainer(cfg: Any, path: Path, job: Any, max_steps: int, **overrides: Any) -> tuple[Any, StepTimer]:
    """The Trainer of `crowdseg fit` (`build_trainer`) for `max_steps` steps, validation off, with a StepTimer."""
    from lightning.pytorch.callbacks import Callback
    from crowdseg.train import build_trainer

    timer_cls = type("StepTimerCallback", (StepTimer, Callback), {})
    timer = timer_cls()
    settings = {"max_steps": max_steps, "max_epochs": -1, "limit_val_batches": 0, "num_sanity_val_steps": 0}
    trainer = build_trainer(cfg, path, job, **{**settings, **overrides})
    trainer.callbacks.append(timer)
    return trainer, timer


def lightning_losses(cfg: Any, path: Path, job: Any, batches: list[dict], **overrides: Any) -> list[float]:
    """Fit `job` with the `crowdseg fit` Trainer on exactly `batches` (one step each); their losses."""
    from torch.utils.data import DataLoader
    trainer, timer = lightning_trainer(cfg, path, job, len(batches), **overrides)
    trainer.fit(job.module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return timer.losses


# ------------------------------------------------------------------------------------------ timing
# The loop case: a small model on small crops (its step is short, so a fixed cost per step shows) on
# batches held in memory (no data cost at all): what is left is the loop itself.
LOOP_OVERRIDES = ["model.backbone=resnet10t", "model.fpn_channels=32", "model.head_channels=32", "data.crop_size=32"]
LOOP_DISTINCT_BATCHES = 8
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
# case -> (extra config overrides, environment of the run, batches from the DataModule (else in memory))
CASES: dict[str, tuple[list[str], dict[str, str], bool]] = {
    "demo": ([], {}, True),                          # `crowdseg fit` as it runs today
    "demo_passive": ([], PASSIVE, True),             # the same with OpenMP threads that sleep when idle
    "loop": (LOOP_OVERRIDES, PASSIVE, False),
}


def steady(ends: list[float], warmup: int) -> float:
    """Seconds per step over the steps after `warmup` (from the end of step `warmup`)."""
    timed = ends[warmup:]
    if len(timed) < 2:
        raise RuntimeError(f"only {len(ends)} steps ran; need more than --warmup {warmup} + 1")
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def summary(cfg: Any, ends: list[float], cpu: list[float], waits: list[float], warmup: int) -> dict[str, Any]:
    step = steady(ends, warmup)
    wait = statistics.fmean(waits[warmup + 1:])
    return {"images_per_s": cfg.data.batch_size / step, "step_s": step, "cpu_step_s": steady(cpu, warmup),
            "data_wait_s": wait, "data_share": wait / step}


def memory_batches(job: Any, count: int) -> list[dict]:
    """`count` training batches held in memory: the first LOOP_DISTINCT_BATCHES of the loader, cycled."""
    from itertools import islice
    distinct = list(islice(iter(job.datamodule.train_dataloader()), LOOP_DISTINCT_BATCHES))
    return [distinct[i % len(distinct)] for i in range(count)]


def run_bare(cfg: Any, case: str, steps: int, warmup: int) -> dict[str, Any]:
    job, _ = build(cfg)
    module = job.module
    module.train()
    optimizer, scheduler = bare_optimizer(module)
    grad_clip = cfg.optim.grad_clip
    total = warmup + steps
    loader = job.datamodule.train_dataloader() if CASES[case][2] else memory_batches(job, total)
    ends, cpu, waits = [], [], []
    while len(ends) < total:                                        # epochs
        iterator = iter(loader)
        while len(ends) < total:
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            waits.append(time.perf_counter() - start)
            bare_step(module, optimizer, batch, grad_clip)
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
        if scheduler is not None:
            scheduler.step()
    return summary(cfg, ends, cpu, waits, warmup)


def run_lightning(cfg: Any, case: str, steps: int, warmup: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    job, path = build(cfg)
    total = warmup + steps
    trainer, timer = lightning_trainer(cfg, path, job, total)
    if CASES[case][2]:
        trainer.fit(job.module, datamodule=job.datamodule)
    else:
        trainer.fit(job.module, train_dataloaders=DataLoader(memory_batches(job, total), batch_size=None))
    waits = [0.0] + [s - e for s, e in zip(timer.starts[1:], timer.ends)]
    result = summary(cfg, timer.ends, timer.cpu, waits, warmup)
    # one `last.ckpt` write as `crowdseg fit` makes it (atomic torch.save of weights + optimizer state)
    start = time.perf_counter()
    trainer.save_checkpoint(path / "checkpoints" / "timed.ckpt")
    result["checkpoint_s"] = time.perf_counter() - start
    result["checkpoint_mb"] = (path / "checkpoints" / "timed.ckpt").stat().st_size / 2 ** 20
    result["checkpoint_every_n_steps"] = cfg.checkpoint_every_n_steps
    result["checkpoint_share"] = result["checkpoint_s"] / (cfg.checkpoint_every_n_steps * result["step_s"])
    return result


def run_data(cfg: Any, case: str, steps: int, warmup: int) -> dict[str, Any]:
    job, _ = build(cfg)
    loader = job.datamodule.train_dataloader()
    ends: list[float] = []
    while len(ends) < warmup + steps:
        for _ in loader:
            ends.append(time.perf_counter())
            if len(ends) == warmup + steps:
                break
    step = steady(ends, warmup)
    return {"images_per_s": cfg.data.batch_size / step, "batch_s": step}


WAYS = {"bare": run_bare, "lightning": run_lightning, "data": run_data}


def worker(args) -> None:
    torch.manual_seed(0)
    overrides = list(args.overrides) + CASES[args.case][0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(Path(args.experiment), overrides, Path(tmp) / "runs")
        result = WAYS[args.worker](cfg, args.case, args.steps, args.warmup)
    result["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


def run_way(args, way: str, case: str, steps: int, warmup: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", way, "--case", case, "--steps", str(steps), "--warmup", str(warmup),
           "--experiment", str(args.experiment), *args.overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **CASES[case][1]})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{way} ({case}) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (demo case)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (demo case)")
    parser.add_argument("--loop-steps", type=int, default=60, help="timed steps of the loop case")
    parser.add_argument("--loop-warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--experiment", default=str(EXPERIMENT))
    parser.add_argument("--worker", choices=sorted(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(CASES), default="demo", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (both ways)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    plan = [(case, way, args.steps, args.warmup) for case in ("demo", "demo_passive") for way in ("bare", "lightning")]
    plan += [("demo", "data", args.steps, args.warmup)]
    plan += [("loop", way, args.loop_steps, args.loop_warmup) for way in ("bare", "lightning")]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    load_avg = []
    for _ in range(args.repeats):                                       # interleaved
        for case, way, steps, warmup in plan:
            load_avg.append(os.getloadavg()[0])
            result = run_way(args, way, case, steps, warmup)
            runs.setdefault(case, {}).setdefault(way, []).append(result)
            print(f"{case:>12} {way:>9}: {result['images_per_s']:7.2f} images/s", flush=True)
    med = {case: {way: median_of(r) for way, r in ways.items()} for case, ways in runs.items()}
    ratios = {case: {"wall": med[case]["lightning"]["images_per_s"] / med[case]["bare"]["images_per_s"],
                     "cpu": med[case]["bare"]["cpu_step_s"] / med[case]["lightning"]["cpu_step_s"]}
              for case in med}
    experiment = Path(args.experiment).resolve()
    result = {
        "command": "python benchmarks/train_loop.py " + " ".join(sys.argv[1:]),
        "experiment": str(experiment.relative_to(ROOT)) if experiment.is_relative_to(ROOT) else str(experiment),
        "overrides": args.overrides,
        "cases": {case: {"overrides": o, "env": e, "batches": "DataModule" if d else "in memory"}
                  for case, (o, e, d) in CASES.items()},
        "steps": args.steps, "warmup": args.warmup, "loop_steps": args.loop_steps, "loop_warmup": args.loop_warmup,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                    "load_avg_1min_during": [round(v, 1) for v in load_avg], "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "lightning_over_bare": ratios,
        "lightning_overhead_demo": 1.0 - ratios["demo"]["wall"],
        "data_share_demo": {w: med["demo"][w]["data_share"] for w in ("bare", "lightning")},
        "passive_over_default_bare": med["demo_passive"]["bare"]["images_per_s"] / med["demo"]["bare"]["images_per_s"],
        "loop_overhead_ms_per_step": 1000 * (med["loop"]["lightning"]["step_s"] - med["loop"]["bare"]["step_s"]),
        "median": med, "runs": runs,
    }
    print(f"\n{'case':>12} {'way':>9} {'images/s':>9} {'s/step':>8} {'CPU s/step':>10} {'data share':>10}")
    for case in CASES:
        for way in ("bare", "lightning"):
            m = med[case][way]
            print(f"{case:>12} {way:>9} {m['images_per_s']:>9.2f} {m['step_s']:>8.3f} {m['cpu_step_s']:>10.3f} "
                  f"{m['data_share']:>10.1%}")
        print(f"{case:>12} lightning / bare: {ratios[case]['wall']:.3f} wall, {ratios[case]['cpu']:.3f} CPU time")
    print(f" demo data loader alone: {med['demo']['data']['images_per_s']:.1f} images/s")
    lt = med["demo"]["lightning"]
    print(f" last.ckpt: {lt['checkpoint_mb']:.0f} MB in {lt['checkpoint_s']:.2f} s, every "
          f"{lt['checkpoint_every_n_steps']:.0f} steps = {lt['checkpoint_share']:.1%} of the demo's steps")
    from crowdseg.io import write_json_atomic
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
