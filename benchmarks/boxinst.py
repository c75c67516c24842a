"""Benchmark: BoxInst training step with vs. without OverlapLoss; the dynamic mask head as one grouped
convolution vs. a per-instance loop; inference peak memory on a 1333 x 800 image with 300 detections.

Part 1 (step): one batch of the occlusion-heavy synthetic crowd (experiments/boxinst/synthetic.yaml:
128 px, ~28 people), the config's model, a full training step (forward, FCOS + projection + pairwise
[+ OverlapLoss, lambda 2], backward, AdamW step). The two variants alternate, `--repeats` times each
after a warm-up; the median of each is reported, and the overhead = median(with) / median(without) - 1.
The issue's target is < 10 %.

Part 2 (dynamic head): `dynamic_mask_logits` (all N instances in one grouped 1x1 convolution per
layer; also 32 instances per call, as `predict_masks` runs it) and `dynamic_mask_logits_bmm` (one
batched matrix product per layer) vs.
`dynamic_mask_logits_loop` (one instance at a time), forward only, 16 mask channels on a
`--feat` stride-8 map, N = 10 / 100 / 500; same outputs checked; median of `--repeats`.

Part 3 (memory): in a fresh subprocess per variant (so the peak RSS is the variant's own), a BoxInst
(`--backbone`, default resnet50, random init) runs inference on one 1333 x 800 image with 300
detections forced (score threshold 0): forward + post-process only, then + the masks (dynamic head,
upsampling, resize, threshold: `predict_masks`) `--chunk` detections at a time, then all 300 at once.
The result holds the 300 full-resolution bool masks (300 x 800 x 1333 bytes = 305 MiB) in every
mask variant. Reported: peak RSS minus the RSS after the
model was built (MiB), and the wall time. CPU only (`ru_maxrss`).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/boxinst.py [--repeats 5] [--feat 60 80]
       [--backbone resnet50] [--chunk 32] [--skip-memory] [--out benchmarks/results/boxinst.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_times(repeats: int) -> dict:
    from crowdseg.config.load import load_config
    from crowdseg.methods.boxinst import build
    from datamodules.types import collate_samples

    torch.manual_seed(0)
    cfg = load_config(ROOT / "experiments" / "boxinst" / "synthetic.yaml", ["boxinst.loss.overlap_weight=2.0"])
    job = build(cfg, Path("/tmp/boxinst_bench"))
    module = job.module
    dataset = job.datamodule.datasets["train"]
    batch = collate_samples([dataset[i] for i in range(cfg.data.batch_size)])
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step(weight: float) -> float:
        module.settings.overlap_weight = weight
        start = time.perf_counter()
        losses = module.compute_losses(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        return time.perf_counter() - start

    step(2.0), step(0.0)  # warm-up
    times = {"with_overlap": [], "without_overlap": []}
    for _ in range(repeats):
        times["with_overlap"].append(step(2.0))
        times["without_overlap"].append(step(0.0))
    # the loss alone on this batch's proposals
    from crowdseg.losses.boxinst import overlap_loss, sample_one_per_group
    n = int(module.compute_losses(batch)["proposals"])
    probs = torch.rand(n, 32, 32, requires_grad=True)
    groups = torch.randint(0, max(n // 2, 1), (n,))
    images = torch.randint(0, cfg.data.batch_size, (n,))
    loss_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        overlap_loss(probs, groups, images, sample_one_per_group(groups)).backward()
        loss_times.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": cfg.data.batch_size, "image": [cfg.data.synthetic.height, cfg.data.synthetic.width],
            "proposals": n, "median_s": med, "all_s": times,
            "overhead": med["with_overlap"] / med["without_overlap"] - 1,
            "overlap_loss_alone_median_s": statistics.median(loss_times)}


def dynamic_head(repeats: int, feat: tuple[int, int], counts=(10, 100, 500)) -> list[dict]:
    from crowdseg.models.boxinst import dynamic_mask_logits, dynamic_mask_logits_bmm, dynamic_mask_logits_loop

    torch.manual_seed(0)
    h, w = feat
    feats = torch.randn(2, 16, h, w)
    rows = []
    for n in counts:
        params = torch.randn(n, 233) * 0.1
        image_index = torch.randint(0, 2, (n,))
        locations = torch.rand(n, 2) * torch.tensor([w * 8.0, h * 8.0])
        soi = torch.full((n,), 64.0)
        args = (feats, 8, params, image_index, locations, soi)
        with torch.no_grad():
            reference = dynamic_mask_logits_loop(*args)
            same = (torch.allclose(dynamic_mask_logits(*args), reference, atol=1e-4)
                    and torch.allclose(dynamic_mask_logits_bmm(*args), reference, atol=1e-4))
            timing = {}
            def grouped_in_chunks(*a, chunk: int = 32):  # as `predict_masks` runs it at inference
                pieces = [dynamic_mask_logits(a[0], a[1], *(x[i:i + chunk] for x in a[2:]))
                          for i in range(0, a[2].shape[0], chunk)]
                return torch.cat(pieces)

            same = same and torch.allclose(grouped_in_chunks(*args), reference, atol=1e-4)
            for name, fn in (("grouped", dynamic_mask_logits), ("grouped_chunks32", grouped_in_chunks),
                             ("bmm", dynamic_mask_logits_bmm), ("loop", dynamic_mask_logits_loop)):
                fn(*args)
                values = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn(*args)
                    values.append(time.perf_counter() - start)
                timing[name] = statistics.median(values)
        rows.append({"instances": n, "feat": [h, w], "grouped_s": timing["grouped"], "bmm_s": timing["bmm"],
                     "grouped_chunks32_s": timing["grouped_chunks32"], "loop_s": timing["loop"],
                     "speedup": timing["loop"] / timing["grouped"],
                     "chunks32_speedup": timing["loop"] / timing["grouped_chunks32"],
                     "bmm_speedup": timing["loop"] / timing["bmm"], "same_output": bool(same)})
    return rows


def memory_worker(variant: str, backbone: str, chunk: int) -> dict:
    """Run in a subprocess: peak RSS of one inference variant (see the module docstring)."""
    from crowdseg.models.boxinst import build_boxinst, pad_to, postprocess, predict_masks

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = build_boxinst(backbone).eval()
    image = torch.rand(1, 3, 800, 1333)
    base = _rss_mib()
    start = time.perf_counter()
    outputs = model(pad_to(image))
    det = postprocess(outputs, torch.tensor([[800, 1333]]), score_threshold=0.0, max_detections=300)[0]
    k = len(det["locations"])
    if variant != "detect":
        masks = predict_masks(model, outputs, 0, det["locations"], (800, 1333), (800, 1333),
                              chunk=chunk if variant == "chunked" else k)
        assert masks.shape == (k, 800, 1333)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "detections": k, "peak_over_model_mib": round(peak - base, 1), "seconds": round(seconds, 2),
            "chunk": chunk if variant == "chunked" else (k if variant == "all_at_once" else None)}


def memory(backbone: str, chunk: int) -> list[dict]:
    rows = []
    for variant in ("detect", "chunked", "all_at_once"):
        out = subprocess.run([sys.executable, __file__, "--memory-worker", variant, "--backbone", backbone,
                              "--chunk", str(chunk)], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--feat", type=int, nargs=2, default=[60, 80], help="stride-8 mask feature map (h w)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "boxinst.json")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.backbone, args.chunk)))
        return
    result = {"command": " ".join(["benchmarks/boxinst.py", *sys.argv[1:]]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "load_average_at_start": os.getloadavg()}
    if not args.skip_step:
        result["step"] = step_times(args.repeats)
        s = result["step"]
        print(f"training step (batch {s['batch']}, {s['proposals']} proposals): without OverlapLoss "
              f"{s['median_s']['without_overlap']:.3f} s, with {s['median_s']['with_overlap']:.3f} s, "
              f"overhead {100 * s['overhead']:+.1f} %; the loss alone {1000 * s['overlap_loss_alone_median_s']:.1f} ms")
    result["dynamic_head"] = dynamic_head(args.repeats, tuple(args.feat))
    print(f"{'instances':>9s} {'grouped s':>10s} {'32 at once':>10s} {'bmm s':>10s} {'loop s':>10s} "
          f"{'loop/grouped':>12s} {'loop/32':>8s} {'loop/bmm':>9s} same")
    for row in result["dynamic_head"]:
        print(f"{row['instances']:9d} {row['grouped_s']:10.4f} {row['grouped_chunks32_s']:10.4f} {row['bmm_s']:10.4f} "
              f"{row['loop_s']:10.4f} {row['speedup']:12.2f} {row['chunks32_speedup']:8.2f} {row['bmm_speedup']:9.2f} "
              f"{row['same_output']}")
    if not args.skip_memory:
        result["memory"] = memory(args.backbone, args.chunk)
        print(f"inference 1333x800, {args.backbone}, 300 detections: peak RSS over the built model")
        for row in result["memory"]:
            print(f"  {row['variant']:12s} {row['peak_over_model_mib']:8.1f} MiB  {row['seconds']:6.2f} s  "
                  f"({row['detections']} detections, chunk {row['chunk']})")
    result["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
