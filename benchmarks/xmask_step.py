"""Benchmark: one XMask teacher-student training step vs. one supervised step on the same batch; online
pseudo-mask building vs. the number of heads (vectorised vs. one point at a time).

Part 1 times, on one batch of synthetic crowd images (`--batch` labeled + `--batch` unlabeled, `--size`
px), `XMaskModule.compute_losses` + backward + Adam step:
- supervised: the phase-1 step of the supervised-only control (`semi=False`): student forward, P2R, backward;
- teacher-student in each phase (semi weight 1): split by the module's own timers into teacher forward,
  pseudo masks (phases 2-3), the student's labeled part (forward + loss), the student's unlabeled part
  (forward + loss), and backward + optimizer step + EMA update.
Each time is the median over `--repeats` runs after one warm-up run. The networks are randomly
initialised: about half of the cells have logit > 0 and nearly all are teacher candidates
(logit >= logit(0.1)), the worst case for pseudo masks and the discriminative loss; `--decoder-bias`
shifts every logit (e.g. -2: few candidates, closer to a teacher after phase 1).

Part 2 builds the pseudo instance map of one (`--height` x `--width`) image with N heads at uniform
random positions and a random unit 16-d embedding (energy threshold 0.8, lambda 0.6, smoothing
included), for N in `--heads`: `pseudo_instance_map` (all points at once) and, for N up to
`--reference-max`, a per-point loop over the whole image (the published algorithm without its
N // 50 subsampling). It reports time, time per head, the number of (point, pixel) pairs, and the
growth exponent between consecutive N (1 = linear).

Usage: .venv/bin/python benchmarks/xmask_step.py [--device cpu] [--backbone resnet18] [--batch 4]
       [--size 256] [--repeats 3] [--decoder-bias 0] [--heads 250 500 1000 2000 4000] [--height 768 --width 1024]
       [--reference-max 500] [--out benchmarks/results/xmask_step.json]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crowdseg.config.schema import OptimConfig  # noqa: E402
from crowdseg.io import write_json_atomic  # noqa: E402
from crowdseg.lit.xmask import XMaskModule  # noqa: E402
from crowdseg.models.backbone import create_backbone  # noqa: E402
from crowdseg.models.xmask import XMaskNet  # noqa: E402
from crowdseg.xmask.discs import disc_pixel_pairs, gaussian_smooth, nn_radii  # noqa: E402
from crowdseg.xmask.pseudo_masks import PseudoMaskSettings, pseudo_instance_map  # noqa: E402
from crowdseg.xmask.schedule import PhaseSchedule, default_phase_lrs  # noqa: E402
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec  # noqa: E402
from datamodules.transforms import TrainTransform, TwoViewTransform, collate_two_views  # noqa: E402
from datamodules.types import collate_samples  # noqa: E402

OPTIM = OptimConfig(lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4, step_size=10 ** 6, gamma=1.0)
PHASE_LRS = default_phase_lrs(OPTIM.lr, OPTIM.backbone_lr, phase2_lr=1e-4, phase3_lr=1e-4)
PARTS = ("teacher_forward", "pseudo_masks", "student_sup", "student_semi", "backward_step")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(args, device):
    spec = SyntheticSpec(height=args.size, width=args.size, min_people=args.people, max_people=args.people, seed=0)
    lab = SyntheticCrowd(args.batch, "train", spec, TrainTransform(crop_size=args.size, scale_range=(1, 1), seed=0))
    unl = SyntheticCrowd(2 * args.batch, "train", spec, TwoViewTransform(crop_size=args.size, scale_range=(1, 1), seed=0))
    labeled = collate_samples([lab[i] for i in range(args.batch)])
    unlabeled = collate_two_views([unl[args.batch + i] for i in range(args.batch)])

    def move(b):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else
                    [t.to(device) for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v)
                for k, v in b.items()}
    return {"labeled": move(labeled), "unlabeled": move(unlabeled)}


def make_module(args, phase: int, semi: bool, device) -> XMaskModule:
    torch.manual_seed(0)
    net = XMaskNet(create_backbone(args.backbone, None, (8, 16)))
    if args.decoder_bias:  # shift every logit (ch1 - ch0) by this: fewer candidate cells, as after phase 1
        out = net.decoder.body[-2]  # conv to 2 * 4 channels before PixelShuffle(2): 0-3 -> ch0, 4-7 -> ch1
        with torch.no_grad():
            out.bias[:4] -= args.decoder_bias / 2
            out.bias[4:] += args.decoder_bias / 2
    ends = {1: (10 ** 6, 10 ** 6), 2: (0, 10 ** 6), 3: (0, 0)}[phase]
    schedule = PhaseSchedule(unit="step", phase1_end=ends[0], phase2_end=ends[1], semi_warmup=-1, ramp_rate=1.0)
    module = XMaskModule(net, schedule, OPTIM, PHASE_LRS, total_steps=-1, semi=semi, eval_teacher=False).to(device)
    module.train()
    module._phase = phase
    module._frozen_modules_to_eval()
    return module


def time_step(module: XMaskModule, optimizer, batch, device) -> dict[str, float]:
    module.timings = {}
    sync(device)
    start = time.perf_counter()
    losses = module.compute_losses(batch)
    sync(device)
    mid = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(module.model.parameters(), 5.0)
    optimizer.step()
    module.teacher.update_parameters(module.model)
    sync(device)
    end = time.perf_counter()
    out = {k: module.timings.get(k, 0.0) for k in PARTS[:4]}
    out["backward_step"] = end - mid
    out["forward_losses"] = mid - start
    out["total"] = end - start
    return out


def bench_steps(args, device) -> list[dict]:
    batch = make_batch(args, device)
    rows = []
    for name, phase, semi in (("supervised (phase 1)", 1, False), ("teacher-student phase 1", 1, True),
                              ("teacher-student phase 2", 2, True), ("teacher-student phase 3", 3, True)):
        module = make_module(args, phase, semi, device)
        optimizer = module.configure_optimizers()
        for group in optimizer.param_groups:
            group["lr"] = module.learning_rates(phase, 0, 0)[group["name"]]
        time_step(module, optimizer, batch, device)  # warm-up
        runs = [time_step(module, optimizer, batch, device) for _ in range(args.repeats)]
        row = {"step": name, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
        rows.append(row)
    base = rows[0]["total"]
    for row in rows:
        row["ratio_to_supervised"] = row["total"] / base
    return rows


def reference_loop(emb: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, s: PseudoMaskSettings) -> torch.Tensor:
    """One point at a time over the whole image (the published loop, all points, lowest energy wins)."""
    D, H, W = emb.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=emb.device).float(), torch.arange(W, device=emb.device).float(),
                            indexing="ij")
    best = torch.full((H, W), math.inf, device=emb.device)
    out = torch.zeros(H, W, dtype=torch.long, device=emb.device)
    for k in range(points.shape[0]):
        cx, cy = points[k]
        c = emb[:, int(cy.round().clamp(0, H - 1)), int(cx.round().clamp(0, W - 1))]
        sq = (xs - cx) ** 2 + (ys - cy) ** 2
        energy = (emb - c[:, None, None]).norm(dim=0) + s.lambda_geo * sq / (radii[k] + 1e-6) ** 2
        claim = (sq <= radii[k] ** 2) & (energy < s.energy_threshold) & (energy <= best)
        best = torch.where(claim, energy, best)
        out[claim] = k + 1
    return out


def bench_pseudo(args, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    H, W = args.height, args.width
    emb = torch.nn.functional.normalize(torch.randn(16, H, W, generator=g), dim=0).to(device)
    s = PseudoMaskSettings()
    rows = []
    for n in args.heads:
        points = (torch.rand(n, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])).to(device)
        pseudo_instance_map(emb, points, settings=s)  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            pseudo_instance_map(emb, points, settings=s)
            sync(device)
            times.append(time.perf_counter() - t)
        radii = nn_radii(points, (H, W))
        pairs = int(disc_pixel_pairs(points, radii, (H, W))[0].numel())
        row = {"heads": n, "vectorised_s": statistics.median(times), "pairs": pairs}
        row["ms_per_head"] = 1000 * row["vectorised_s"] / n
        if n <= args.reference_max:
            smoothed = gaussian_smooth(emb, s.kernel_size, s.sigma)
            sync(device)
            t = time.perf_counter()
            reference_loop(smoothed, points, radii, s)
            sync(device)
            row["per_point_loop_s"] = time.perf_counter() - t
            row["speedup"] = row["per_point_loop_s"] / row["vectorised_s"]
        rows.append(row)
    for prev, row in zip(rows, rows[1:]):
        row["growth_exponent"] = math.log(row["vectorised_s"] / prev["vectorised_s"]) / math.log(row["heads"] / prev["heads"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--people", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoder-bias", type=float, default=0.0,
                   help="add to every logit of the (random) network; 0: random init, where nearly every cell is a "
                        "teacher candidate (the worst case)")
    p.add_argument("--heads", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--reference-max", type=int, default=500)
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "xmask_step.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    console = Console()
    result = {"command": " ".join(sys.argv), "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "platform": platform.platform(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.skip_steps:
        steps = bench_steps(args, device)
        result["steps"] = steps
        table = Table(title=f"XMask step, {args.backbone}, batch {args.batch}+{args.batch} of {args.size} px, {device} (s, median)")
        for col in ("step", *PARTS, "total", "x supervised"):
            table.add_column(col)
        for r in steps:
            table.add_row(r["step"], *[f"{r[k]:.3f}" for k in PARTS], f"{r['total']:.3f}", f"{r['ratio_to_supervised']:.2f}")
        console.print(table)
    pseudo = bench_pseudo(args, device)
    result["pseudo_masks"] = pseudo
    table = Table(title=f"pseudo instance map of a {args.height} x {args.width} image (s, median)")
    for col in ("heads", "vectorised", "ms / head", "pairs", "growth exp.", "per-point loop", "speed-up"):
        table.add_column(col)
    for r in pseudo:
        table.add_row(str(r["heads"]), f"{r['vectorised_s']:.3f}", f"{r['ms_per_head']:.3f}", str(r["pairs"]),
                      f"{r['growth_exponent']:.2f}" if "growth_exponent" in r else "-",
                      f"{r['per_point_loop_s']:.2f}" if "per_point_loop_s" in r else "-",
                      f"{r['speedup']:.0f}x" if "speedup" in r else "-")
    console.print(table)
    write_json_atomic(Path(args.out), result)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
