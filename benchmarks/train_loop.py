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

Each case runs in one fresh process: `--rounds` pairs of a bare segment and a Lightning segment
(alternating which goes first), each from the same initial weights and the same batches (the random
state is reset before each segment and the bare loop's workers are seeded as Lightning seeds them;
the JSON says whether the first losses agreed), timed after its warm-up steps, so the slow swings
of a shared machine hit both ways alike. Without that, the two ways train on different crops, and
the cost of a step varies with its crop by more than Lightning's overhead. Reported: the median over rounds
of the per-round ratio Lightning / bare (images/s), the medians of each way, and the training
process's CPU time per step (much less disturbed by other jobs than wall time). The Lightning
segments also time one `last.ckpt` write, amortised over `checkpoint_every_n_steps`. The
DataLoader alone runs in a process of its own.

    .venv/bin/python benchmarks/train_loop.py [--steps 6] [--warmup 2] [--rounds 3] [--loop-steps 60]
                                              [--loop-rounds 4] [key=value ...]

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


def bare_segment(cfg: Any, job: Any, path: Path, module: Any, batches: Optional[list[dict]], total: int,
                 warmup: int) -> dict[str, Any]:
    """`total` steps of the bare loop on `module` (from the DataModule, or on `batches` held in memory)."""
    module.train()
    optimizer, scheduler = bare_optimizer(module)
    grad_clip = cfg.optim.grad_clip
    if batches is None:
        from functools import partial

        from lightning.fabric.utilities.seed import pl_worker_init_function
        loader = job.datamodule.train_dataloader()
        # seed the workers as Lightning does under seed_everything(workers=True), so both ways get the same crops
        loader.worker_init_fn = partial(pl_worker_init_function, rank=0)
    else:
        loader = batches
    ends, cpu, waits, losses = [], [], [], []
    while len(ends) < total:                                        # epochs
        iterator = iter(loader)
        while len(ends) < total:
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            waits.append(time.perf_counter() - start)
            losses.append(bare_step(module, optimizer, batch, grad_clip))
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
        if scheduler is not None:
            scheduler.step()
    return {**summary(cfg, ends, cpu, waits, warmup), "first_loss": losses[0]}


def lightning_segment(cfg: Any, job: Any, path: Path, module: Any, batches: Optional[list[dict]], total: int,
                      warmup: int) -> dict[str, Any]:
    """`total` steps of `crowdseg fit`'s Trainer on `module` (the job's DataModule, or `batches`)."""
    from torch.utils.data import DataLoader
    trainer, timer = lightning_trainer(cfg, path, job, total)
    if batches is None:
        trainer.fit(module, datamodule=job.datamodule)
    else:
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    waits = [0.0] + [s - e for s, e in zip(timer.starts[1:], timer.ends)]
    result = {**summary(cfg, timer.ends, timer.cpu, waits, warmup), "first_loss": timer.losses[0]}
    # one `last.ckpt` write as `crowdseg fit` makes it (atomic torch.save of weights + optimizer state)
    start = time.perf_counter()
    trainer.save_checkpoint(path / "checkpoints" / "timed.ckpt")
    result["checkpoint_s"] = time.perf_counter() - start
    result["checkpoint_mb"] = (path / "checkpoints" / "timed.ckpt").stat().st_size / 2 ** 20
    return result


def run_pair(cfg: Any, case: str, steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    """`rounds` x (a bare segment and a Lightning segment, alternating which goes first), each from the
    same initial weights and the same batches (the random state is reset before each), in this one
    process: slow drifts of a shared machine hit both ways alike."""
    import copy

    import lightning as L
    job, path = build(cfg)
    initial = copy.deepcopy(job.module)
    total = warmup + steps
    batches = None if CASES[case][2] else memory_batches(job, total)
    segments = {"bare": bare_segment, "lightning": lightning_segment}
    out: dict[str, list[dict[str, Any]]] = {"bare": [], "lightning": []}
    for r in range(rounds):
        for way in (("bare", "lightning") if r % 2 == 0 else ("lightning", "bare")):
            module = copy.deepcopy(initial)
            L.seed_everything(cfg.seed, workers=True, verbose=False)   # the same shuffle and crops each time
            out[way].append(segments[way](cfg, job, path, module, batches, total, warmup))
    ratios = [lt["images_per_s"] / bare["images_per_s"] for bare, lt in zip(out["bare"], out["lightning"])]
    same = all(abs(lt["first_loss"] - bare["first_loss"]) <= 1e-5 * abs(bare["first_loss"])
               for bare, lt in zip(out["bare"], out["lightning"]))
    return {"segments": out, "round_ratios": ratios, "same_first_batch": same,
            "checkpoint_every_n_steps": cfg.checkpoint_every_n_steps}


def run_data(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
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


def worker(args) -> None:
    torch.manual_seed(0)
    overrides = list(args.overrides) + CASES[args.case][0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(Path(args.experiment), overrides, Path(tmp) / "runs")
        if args.worker == "data":
            result = run_data(cfg, args.steps, args.warmup)
        else:
            result = run_pair(cfg, args.case, args.steps, args.warmup, args.rounds)
    result["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


def run_worker(args, what: str, case: str, steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", what, "--case", case, "--steps", str(steps), "--warmup", str(warmup),
           "--rounds", str(rounds), "--experiment", str(args.experiment), *args.overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **CASES[case][1]})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{what} ({case}) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per segment (demo cases)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (demo cases)")
    parser.add_argument("--rounds", type=int, default=3, help="bare + Lightning segment pairs (demo cases)")
    parser.add_argument("--loop-steps", type=int, default=60, help="timed steps per segment of the loop case")
    parser.add_argument("--loop-warmup", type=int, default=5)
    parser.add_argument("--loop-rounds", type=int, default=4)
    parser.add_argument("--experiment", default=str(EXPERIMENT))
    parser.add_argument("--worker", choices=("pair", "data"), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(CASES), default="demo", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (every run)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    plan = {"demo": (args.steps, args.warmup, args.rounds), "demo_passive": (args.steps, args.warmup, args.rounds),
            "loop": (args.loop_steps, args.loop_warmup, args.loop_rounds)}
    cases, load_avg = {}, {}
    for case, (steps, warmup, rounds) in plan.items():
        load_avg[case] = os.getloadavg()[0]
        cases[case] = run_worker(args, "pair", case, steps, warmup, rounds)
        print(f"{case:>12}: Lightning / bare per round {[round(r, 3) for r in cases[case]['round_ratios']]}"
              f" (same first batch: {cases[case]['same_first_batch']})", flush=True)
    data = run_worker(args, "data", "demo", args.steps, args.warmup, 1)
    med = {case: {way: median_of(segs) for way, segs in c["segments"].items()} for case, c in cases.items()}
    ratios = {case: {"median_of_round_ratios": statistics.median(c["round_ratios"]),
                     "wall": med[case]["lightning"]["images_per_s"] / med[case]["bare"]["images_per_s"],
                     "cpu": med[case]["bare"]["cpu_step_s"] / med[case]["lightning"]["cpu_step_s"]}
              for case, c in cases.items()}
    experiment = Path(args.experiment).resolve()
    demo_lt = med["demo"]["lightning"]
    every = cases["demo"]["checkpoint_every_n_steps"]
    result = {
        "command": "python benchmarks/train_loop.py " + " ".join(sys.argv[1:]),
        "experiment": str(experiment.relative_to(ROOT)) if experiment.is_relative_to(ROOT) else str(experiment),
        "overrides": args.overrides,
        "cases": {case: {"overrides": o, "env": e, "batches": "DataModule" if d else "in memory",
                         "steps": plan[case][0], "warmup": plan[case][1], "rounds": plan[case][2]}
                  for case, (o, e, d) in CASES.items()},
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                    "load_avg_1min_at_start": {k: round(v, 1) for k, v in load_avg.items()},
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "lightning_over_bare": ratios,
        "lightning_overhead_demo": 1.0 - ratios["demo"]["median_of_round_ratios"],
        "data_share_demo": {w: med["demo"][w]["data_share"] for w in ("bare", "lightning")},
        "data_loader_alone_images_per_s": data["images_per_s"],
        "passive_over_default_bare": med["demo_passive"]["bare"]["images_per_s"] / med["demo"]["bare"]["images_per_s"],
        "checkpoint": {"mb": demo_lt["checkpoint_mb"], "s": demo_lt["checkpoint_s"], "every_n_steps": every,
                       "share_demo": demo_lt["checkpoint_s"] / (every * demo_lt["step_s"]),
                       "share_demo_passive": med["demo_passive"]["lightning"]["checkpoint_s"]
                       / (every * med["demo_passive"]["lightning"]["step_s"])},
        "median": med, "runs": cases, "data_run": data,
    }
    print(f"\n{'case':>12} {'way':>9} {'images/s':>9} {'s/step':>8} {'CPU s/step':>10} {'data share':>10}")
    for case in CASES:
        for way in ("bare", "lightning"):
            m = med[case][way]
            print(f"{case:>12} {way:>9} {m['images_per_s']:>9.2f} {m['step_s']:>8.3f} {m['cpu_step_s']:>10.3f} "
                  f"{m['data_share']:>10.1%}")
        r = ratios[case]
        print(f"{case:>12} Lightning / bare: {r['median_of_round_ratios']:.3f} (median of rounds), "
              f"{r['wall']:.3f} (medians), {r['cpu']:.3f} (CPU time)")
    print(f"demo DataLoader alone: {data['images_per_s']:.1f} images/s")
    c = result["checkpoint"]
    print(f"last.ckpt: {c['mb']:.0f} MB in {c['s']:.2f} s, every {every} steps = {c['share_demo']:.2%} (demo), "
          f"{c['share_demo_passive']:.2%} (demo_passive) of the training time")
    from crowdseg.io import write_json_atomic
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
