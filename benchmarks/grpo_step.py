"""Benchmark: one RPS GRPO step vs. one supervised (P2P) step on the same batch; batched SAM rewards
vs. one prompt at a time.

Part 1 times, on one batch of synthetic crowd images, with the models of experiments/rps/synthetic.yaml
(resnet10t proposer, the tiny random SAM unless --sam says otherwise):
- a supervised step of the point predictor: forward, P2P loss (Hungarian matching), backward,
  gradient clipping, Adam step;
- a GRPO step of `RPSModule` with K candidates and G samples per group, split into the phases the
  module runs: the frozen proposer's forward, SAM image encoding, SAM decoding (all N*K prompts in
  chunks of `--chunk`), reward and candidate post-processing (NNEC radii, sampling, matching, mask
  sampling inside the discs, IoU with the GT instance: everything in `RPSModule.rollout` that is not
  SAM), and the policy update (pi_old scores, G samples per group, advantages, reference scores,
  `--ppo-epochs` x [scorer forward, clipped loss, backward, clip, Adam step]).
  SAM's time is measured by wrapping the predictor's `encode` / `decode`; the rollout itself is
  `RPSModule.rollout`, and the update replicates `RPSModule.training_step` line for line.
Each time is the median over `--repeats` runs after one warm-up run.

Part 2 computes the rewards of the N*K candidates of one image (N people, K candidates) twice:
batched (`--chunk` prompts per decoder call, one cached embedding) and one prompt per decoder call
(same embedding), and checks both give the same rewards.

Usage: .venv/bin/python benchmarks/grpo_step.py [--device cpu] [--sam tiny] [--batch 4] [--size 128]
       [--people 30] [--candidates 8] [--group 8] [--ppo-epochs 1] [--chunk 256] [--repeats 3]
       [--people-list 10 40 120] [--out benchmarks/results/grpo_step.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crowdseg.config.schema import OptimConfig  # noqa: E402
from crowdseg.io import write_json_atomic  # noqa: E402
from crowdseg.lit.rps import RPSModule  # noqa: E402
from crowdseg.losses.p2p import P2PLoss  # noqa: E402
from crowdseg.methods.p2p import PointLossConfig  # noqa: E402
from crowdseg.methods.rps import RpsConfig  # noqa: E402
from crowdseg.models.backbone import create_backbone  # noqa: E402
from crowdseg.models.p2p import PointPredictor  # noqa: E402
from crowdseg.rl.candidates import sample_candidates  # noqa: E402
from crowdseg.rl.grpo import group_advantages, grpo_loss  # noqa: E402
from crowdseg.rl.policy import CandidateScorer, log_prob, sample  # noqa: E402
from crowdseg.rl.reward import match_points_to_instances  # noqa: E402
from crowdseg.rl.sam_env import EnvOptions, SamEnvironment  # noqa: E402
from crowdseg.sam import BatchedSamPredictor, build_sam  # noqa: E402
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec  # noqa: E402
from datamodules.types import collate_samples  # noqa: E402


class Clock:
    """Accumulates wall time per phase; synchronises CUDA around each measurement."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds

    def wrap(self, obj, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = self.now()
            out = inner(*args, **kwargs)
            self.add(phase, self.now() - start)
            return out
        setattr(obj, name, timed)


def build_models(args, device):
    torch.manual_seed(0)
    proposer = PointPredictor(create_backbone(args.backbone, reductions=(8, 16)), args.channels, args.channels).to(device)
    scorer = CandidateScorer(args.channels, PointPredictor.stride, 128, 2).to(device)
    predictor = BatchedSamPredictor(build_sam(args.sam, device=device, seed=0), args.chunk)
    return proposer, scorer, predictor


def supervised_step(proposer, criterion, optimizer, batch, clock: Clock) -> None:
    start = clock.now()
    outputs = proposer(batch["image"])
    loss = criterion(outputs, batch["points"])["loss"]
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(proposer.parameters(), 1.0)
    optimizer.step()
    clock.add("total", clock.now() - start)


def grpo_step(module: RPSModule, optimizer, batch, clock: Clock, generator: torch.Generator) -> None:
    s = module.settings
    start = clock.now()
    with torch.no_grad():
        outputs = module.proposer(batch["image"])
    clock.add("proposer", clock.now() - start)
    before = dict(clock.totals)
    t0 = clock.now()
    with torch.no_grad():
        ro = module.rollout(batch, outputs, generator)
    sam = sum(clock.totals.get(k, 0.0) - before.get(k, 0.0) for k in ("sam_encode", "sam_decode"))
    clock.add("reward", clock.now() - t0 - sam)

    t0 = clock.now()
    features = outputs["features"].detach()
    scores = lambda net: net(features, ro.candidates, ro.points, ro.radii, ro.batch_index)  # noqa: E731
    with torch.no_grad():
        old_logits = scores(module.scorer)
    actions = sample(old_logits, s.group_size, generator)
    advantages, valid = group_advantages(ro.rewards.gather(1, actions))
    valid = valid & (ro.matched >= 0)
    with torch.no_grad():
        old_logp = log_prob(old_logits, actions)
        ref_logp = log_prob(scores(module.reference), actions)
    for _ in range(s.ppo_epochs):
        loss, _ = grpo_loss(log_prob(scores(module.scorer), actions), old_logp, advantages, valid, ref_logp,
                            s.clip_eps, s.beta)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.scorer.parameters(), 1.0)
        optimizer.step()
    clock.add("policy_update", clock.now() - t0)
    clock.add("total", clock.now() - start)


def time_steps(args, device) -> dict:
    proposer, scorer, predictor = build_models(args, device)
    data = SyntheticCrowd(args.batch, "train", SyntheticSpec(height=args.size, width=args.size,
                                                             min_people=args.people, max_people=args.people))
    batch = collate_samples([data[i] for i in range(args.batch)])
    batch["image"] = batch["image"].to(device)
    batch["points"] = [p.to(device) for p in batch["points"]]
    batch["instance_map"] = [m.to(device) for m in batch["instance_map"]]

    environment = SamEnvironment(predictor, EnvOptions(tile=False))
    settings = RpsConfig(num_candidates=args.candidates, group_size=args.group, ppo_epochs=args.ppo_epochs)
    module = RPSModule(proposer, scorer, environment, settings, PointLossConfig.score_threshold, seed=0,
                       optim=OptimConfig(), total_steps=-1).to(device)  # the optimizer below is the benchmark's own
    module.proposer.eval()
    grpo_clock = Clock(device)
    grpo_clock.wrap(predictor, "encode", "sam_encode")
    grpo_clock.wrap(predictor, "decode", "sam_decode")
    policy_optimizer = torch.optim.Adam(module.scorer.parameters(), lr=1e-3)

    sup_model = PointPredictor(create_backbone(args.backbone, reductions=(8, 16)), args.channels, args.channels).to(device)
    sup_model.load_state_dict(proposer.state_dict())
    sup_model.train()
    sup_optimizer = torch.optim.Adam(sup_model.parameters(), lr=1e-4)
    criterion = P2PLoss()

    runs: dict[str, list[dict[str, float]]] = {"supervised": [], "grpo": []}
    generator = torch.Generator().manual_seed(0)
    for r in tqdm(range(args.repeats + 1), desc="steps"):
        sup_clock = Clock(device)
        supervised_step(sup_model, criterion, sup_optimizer, batch, sup_clock)
        grpo_clock.totals = {}
        grpo_step(module, policy_optimizer, batch, grpo_clock, generator)
        if r > 0:                                   # the first run warms caches and allocators up
            runs["supervised"].append(sup_clock.totals)
            runs["grpo"].append(dict(grpo_clock.totals))
    median = lambda rows, key: statistics.median(row.get(key, 0.0) for row in rows)  # noqa: E731
    phases = ("proposer", "sam_encode", "sam_decode", "reward", "policy_update")
    grpo = {k: median(runs["grpo"], k) for k in phases + ("total",)}
    sup = median(runs["supervised"], "total")
    prompts = sum(len(p) for p in batch["points"]) * args.candidates
    return {"supervised_s": sup, "grpo_s": grpo, "ratio": grpo["total"] / sup, "prompts": prompts,
            "people": [len(p) for p in batch["points"]]}


def batched_vs_single(args, device) -> list[dict]:
    sam = build_sam(args.sam, device=device, seed=0)
    rows = []
    for people in tqdm(args.people_list, desc="rewards"):
        sample_ = SyntheticCrowd(1, "test", SyntheticSpec(height=256, width=256, min_people=people,
                                                          max_people=people, seed=1))[0]
        result = {"people": int(len(sample_["points"])), "candidates": args.candidates}
        rewards = {}
        for mode, chunk in (("batched", args.chunk), ("single", 1)):
            env = SamEnvironment(BatchedSamPredictor(sam, chunk), EnvOptions(tile=False))
            scene = env.prepare(sample_["image"].to(device), sample_["points"])
            env.embedding(scene, 0)                                   # the cached embedding, shared
            points = torch.from_numpy(scene.points).float().to(device)
            radii = torch.from_numpy(scene.radii).float().to(device)
            candidates = sample_candidates(points, radii, args.candidates, 0.5, scene.image_hw,
                                           torch.Generator().manual_seed(0))
            matched = match_points_to_instances(points, sample_["points"].to(device), radii,
                                                sample_["instance_map"].to(device))
            clock = Clock(device)
            times = []
            for _ in range(args.repeats if mode == "batched" else 1):
                start = clock.now()
                rewards[mode] = env.rewards(scene, candidates, matched, sample_["instance_map"].to(device))
                times.append(clock.now() - start)
            result[f"{mode}_s"] = statistics.median(times)
        result["prompts"] = result["people"] * args.candidates
        result["speedup"] = result["single_s"] / result["batched_s"]
        result["max_reward_difference"] = float((rewards["batched"] - rewards["single"]).abs().max())
        rows.append(result)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sam", default="tiny", help="SAM model type (random weights; no checkpoint)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--people-list", type=int, nargs="+", default=[10, 40, 120])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    steps = time_steps(args, device)
    rewards = batched_vs_single(args, device)

    console = Console()
    table = Table(title=f"One training step, batch {args.batch} x {args.size}px, {sum(steps['people'])} people, "
                        f"K={args.candidates}, G={args.group}, {steps['prompts']} SAM prompts ({args.sam} SAM, {device})")
    table.add_column("step / phase")
    table.add_column("seconds", justify="right")
    table.add_column("share of GRPO step", justify="right")
    g = steps["grpo_s"]
    table.add_row("supervised (p2p) step", f"{steps['supervised_s']:.3f}", "")
    table.add_row("GRPO step", f"{g['total']:.3f}", "100%")
    for phase in ("proposer", "sam_encode", "sam_decode", "reward", "policy_update"):
        table.add_row(f"  {phase}", f"{g[phase]:.3f}", f"{100 * g[phase] / g['total']:.0f}%")
    table.add_row("ratio GRPO / supervised", f"{steps['ratio']:.1f}x", "")
    console.print(table)

    table = Table(title=f"Rewards of N x {args.candidates} candidates of one 256px image: batched "
                        f"({args.chunk} prompts per decoder call) vs. one prompt per call")
    for col in ("people", "prompts", "batched s", "one at a time s", "speedup", "max |reward diff|"):
        table.add_column(col, justify="right")
    for row in rewards:
        table.add_row(str(row["people"]), str(row["prompts"]), f"{row['batched_s']:.3f}", f"{row['single_s']:.3f}",
                      f"{row['speedup']:.1f}x", f"{row['max_reward_difference']:.2g}")
    console.print(table)

    result = {
        "command": "benchmarks/grpo_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "step": steps,
        "rewards_batched_vs_single": rewards,
    }
    write_json_atomic(Path(args.out), result)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
