"""DPMO mask generation speed and memory on real UCF-CC-50 images: batched vs one prompt at a time.

For each SAM model (`tiny`, and `vit_b` randomly initialised: the same cost as the trained one):

1. same work, one encoder pass (tiling off, the image resized to the model input like
   `SamPredictor` does), on M points of image 1 (4,633 heads; for vit_b the M nearest the crowd's median):
   - batched: `generate_instance_map` (chunked prompts, windowed decoding), its time split into
     encoder / decoder / post-processing;
   - floor: the encoder time + one batched pass of SAM's own mask decoder over the M prompts
     (prompt encoder + `mask_decoder`, chunked, full 256x256 logits, nothing else);
   - naive: `segment_anything.SamPredictor` (set_image, then `predict` once per point with the
     same prompts, return_logits=True; the same candidate choice and highest-logit pasting done
     per point in numpy on the circle's bounding box). Timed on the first K points; the median
     point's time x M is the extrapolation (the per-point cost does not depend on how many came
     before; the median ignores bursts of other jobs on a shared machine).
   Batched and floor: the best of `--repeats` runs.
2. growth: total time at 250 / 500 / 1000 / 2000 / 4000 points (the n points nearest to the
   crowd's median, so head sizes stay those of the image; tiling off so the encoder work is
   constant).
3. decoder: the decoder alone on a random embedding, per prompt, by prompt batch size (1, 16, 64):
   our windowed `decode` in float32, under bfloat16 autocast, and with its two-way transformer
   compiled by `torch.compile` (fused elementwise work), against SAM's own prompt encoder + mask
   decoder one prompt at a time. This shows where batching pays: on a GPU one B = 1 decode is
   latency-bound; on a CPU it is already bound by the work per prompt.
4. the default settings (tiling on) on the whole 4,633-head image; for vit_b in a child process
   that reports its peak RSS (and `torch.cuda.max_memory_allocated` on CUDA). `--memory-tiles K`
   stops that run after K encoded tiles (the per-tile work is the same in every tile, so the peak
   is that of the whole run; 0 runs it all).

    .venv/bin/python benchmarks/dpmo.py                  # defaults: about 10 minutes on 2 idle cores
    .venv/bin/python benchmarks/dpmo.py --models tiny    # tiny only

Writes benchmarks/results/dpmo.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import scipy.io
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from crowdseg.methods.dpmo import DpmoConfig  # noqa: E402
from crowdseg.dpmo import generate_instance_map, nearest_neighbours, nnec_radii  # noqa: E402
from crowdseg.sam import BatchedSamPredictor, build_sam  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ucf_cc_50"


def load_image(index: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB (the grayscale file repeated) and (N, 2) 0-based points."""
    gray = cv2.imread(str(DATA / f"{index}.jpg"), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise SystemExit(f"missing {DATA / f'{index}.jpg'}")
    points = scipy.io.loadmat(DATA / f"{index}_ann.mat")["annPoints"].astype(np.float64) - 1.0
    return np.repeat(gray[..., None], 3, axis=2), points


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


def subset(points: np.ndarray, n: int) -> np.ndarray:
    """The n points nearest to the image's densest region (the points' median): a contiguous patch of
    the crowd, so head sizes and NNEC radii stay those of the full image as n grows."""
    if n >= len(points):
        return points
    centre = np.median(points, 0)
    return points[np.sort(np.argsort(np.linalg.norm(points - centre, axis=1), kind="stable")[:n])]


def warm_up(predictor: BatchedSamPredictor) -> None:
    """One untimed encoder pass and decode, so no measured call pays first-call allocation costs."""
    size = predictor.input_size
    embedding = predictor.encode(torch.rand(3, size, size))
    coords, labels = torch.rand(8, 2, 2) * size, torch.ones(8, 2, dtype=torch.long)
    predictor.decode(embedding, coords, labels, torch.zeros(8, 2, dtype=torch.long), 2)


def batched(predictor, rgb, points, cfg, repeats: int = 1) -> dict:
    """The fastest of `repeats` runs of `generate_instance_map` (its time split)."""
    runs = [generate_instance_map(predictor, to_tensor(rgb), points, cfg)[1] for _ in range(repeats)]
    report = min(runs, key=lambda r: r["timings"]["total_s"])
    return {"points": len(points), **report["timings"], "tiles": report["tiles"],
            "tiles_encoded": report["tiles_encoded"], "empty_fallbacks": report["empty_fallbacks"]}


@torch.inference_mode()
def sam_decoder_pass(model, rgb, points, cfg, chunk: int) -> float:
    """Seconds of SAM's own prompt encoder + mask decoder over all prompts (chunked), nothing else."""
    h, w = rgb.shape[:2]
    scale = model.image_encoder.img_size / max(h, w)
    features = torch.randn(1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    nb = nearest_neighbours(points, cfg.num_negatives)
    coords = np.concatenate([points[:, None], points[np.clip(nb, 0, None)]], 1) * scale
    labels = np.concatenate([np.ones((len(points), 1)), np.where(nb >= 0, 0, -1)], 1)
    coords_t, labels_t = torch.from_numpy(coords).float(), torch.from_numpy(labels).long()
    start = time.perf_counter()
    for s in range(0, len(points), chunk):
        sparse, dense = model.prompt_encoder(points=(coords_t[s:s + chunk], labels_t[s:s + chunk]), boxes=None, masks=None)
        model.mask_decoder(image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    return time.perf_counter() - start


@torch.inference_mode()
def decoder_scaling(model, device: str, batch_sizes=(1, 16, 64), prompts: int = 64, repeats: int = 2) -> dict:
    """Milliseconds per prompt of the decoder alone (random embedding, 1 positive + 3 negative points)."""
    from crowdseg.sam import predictor as predictor_module
    gen = torch.Generator().manual_seed(0)
    pe = model.prompt_encoder
    features = torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=gen).to(device)
    embedding = predictor_module.ImageEmbedding(features, (pe.input_image_size[0],) * 2)
    coords = (torch.rand(prompts, 4, 2, generator=gen) * pe.input_image_size[0]).to(device)
    labels = torch.tensor([[1, 0, 0, 0]] * prompts, device=device)
    origins = (coords[:, 0].flip(-1) / (pe.input_image_size[0] // pe.image_embedding_size[0])).long() - 1
    predictor = BatchedSamPredictor(model)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def per_prompt_ms(run_chunk, chunk: int, autocast: bool = False) -> float:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            run_chunk(slice(0, chunk))                                 # warm-up (and compilation)
            best = float("inf")
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                for s in range(0, prompts, chunk):
                    run_chunk(slice(s, s + chunk))
                sync()
                best = min(best, time.perf_counter() - start)
        return 1000 * best / prompts

    def ours(index):
        predictor.decode(embedding, coords[index], labels[index], origins[index], cells=4)

    def sams_own(index):
        sparse, dense = pe(points=(coords[index], labels[index]), boxes=None, masks=None)
        model.mask_decoder(image_embeddings=features, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                           dense_prompt_embeddings=dense, multimask_output=True)

    result = {"prompts": prompts, "sam_decoder_b1_ms": per_prompt_ms(sams_own, 1), "ours_ms": {}, "ours_bf16_ms": {},
              "ours_compiled_ms": {}}
    for b in batch_sizes:
        result["ours_ms"][b] = per_prompt_ms(ours, b)
        result["ours_bf16_ms"][b] = per_prompt_ms(ours, b, autocast=True)
    eager = predictor_module.two_way_transformer
    predictor_module.two_way_transformer = torch.compile(eager, dynamic=False)
    try:
        for b in batch_sizes:
            result["ours_compiled_ms"][b] = per_prompt_ms(ours, b)
    finally:
        predictor_module.two_way_transformer = eager
    return result


def naive(model, rgb, points, cfg, k: int) -> dict:
    """SamPredictor.predict one point at a time on the first k points; seconds per point (median)."""
    from segment_anything import SamPredictor
    h, w = rgb.shape[:2]
    radii = nnec_radii(points, (h, w), cfg.radius_factor, cfg.r_min, cfg.r_max, cfg.lone_radius)
    nb = nearest_neighbours(points, cfg.num_negatives)
    predictor = SamPredictor(model)
    start = time.perf_counter()
    predictor.set_image(rgb)
    encoder_s = time.perf_counter() - start
    best = np.full((h, w), -np.inf, np.float32)
    owner = np.zeros((h, w), np.int32)
    per_point, predict = [], []
    for i in range(min(k, len(points))):
        start = time.perf_counter()
        negs = points[nb[i][nb[i] >= 0]]
        coords = np.concatenate([points[i:i + 1], negs])
        labels = np.array([1] + [0] * len(negs))
        t = time.perf_counter()
        logits, iou, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=True,
                                           return_logits=True)
        predict.append(time.perf_counter() - t)
        # the same choice and pasting as DPMO, on the circle's bounding box only
        x, y, r = points[i, 0], points[i, 1], radii[i]
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, w)
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, h)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
        fg = logits > 0
        area = fg.sum((1, 2))
        score = iou * np.where(area > 0, (fg[:, y0:y1, x0:x1] & disc).sum((1, 2)) / np.maximum(area, 1), 0)
        chosen = logits[int(score.argmax()), y0:y1, x0:x1]
        claim = disc & (chosen > 0) & (chosen > best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][claim] = chosen[claim]
        owner[y0:y1, x0:x1][claim] = i + 1
        per_point.append(time.perf_counter() - start)
    # the median point: robust to other jobs' bursts on a shared machine
    return {"encoder_s": encoder_s, "per_point_s": float(np.median(per_point)), "per_point_mean_s": float(np.mean(per_point)),
            "predict_per_point_s": float(np.median(predict)), "points_timed": len(per_point)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Unlike ru_maxrss it restarts at exec, so a child
    process does not inherit the high-water mark of the parent it was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(args) -> None:
    """Child process: the default (tiled) DPMO on the whole image; prints JSON with peak memory."""
    rgb, points = load_image(args.image)
    model = build_sam(args.worker_model, device=args.device)
    predictor = BatchedSamPredictor(model, args.chunk)
    base_rss = peak_rss_mb()
    warm_up(predictor)
    limit = args.memory_tiles

    class Stop(Exception):
        pass

    encode = predictor.encode
    count = {"tiles": 0}

    def limited_encode(image):
        if limit and count["tiles"] >= limit:
            raise Stop
        count["tiles"] += 1
        return encode(image)

    predictor.encode = limited_encode
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = None
    try:
        _, report = generate_instance_map(predictor, to_tensor(rgb), points, DpmoConfig())
    except Stop:
        pass
    out = {"model": args.worker_model, "points": len(points), "seconds": time.perf_counter() - start,
           "tiles_encoded": count["tiles"], "stopped_early": report is None,
           "peak_rss_mb": peak_rss_mb(), "rss_after_model_mb": base_rss,
           "cuda_max_allocated_mb": (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None)}
    if report is not None:
        out.update(tiles=report["tiles"], timings=report["timings"])
    out["tiles_with_points"] = count_tiles(rgb.shape[:2], points, predictor.input_size, DpmoConfig())
    print(json.dumps(out))


def count_tiles(image_hw, points, input_size: int, cfg: DpmoConfig) -> int:
    """How many tiles of the default plan own at least one point (= encoder passes of a full run)."""
    from types import SimpleNamespace

    from crowdseg.dpmo.scene import prepare_scene
    shape = SimpleNamespace(input_size=input_size, device=torch.device("cpu"))    # tiling needs no SAM
    scene = prepare_scene(shape, torch.zeros(3, *image_hw), points, cfg)
    return len(set(scene.tile_of.tolist()))


def memory_run(args, model_type: str) -> dict:
    cmd = [sys.executable, __file__, "--worker-model", model_type, "--image", str(args.image), "--chunk", str(args.chunk),
           "--memory-tiles", str(args.memory_tiles), "--device", args.device]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--image", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=64, help="prompt chunk (sam.prompt_chunk)")
    parser.add_argument("--vitb-points", type=int, default=128, help="M for vit_b's same-work comparison")
    parser.add_argument("--naive-points", type=int, default=16, help="K points timed the naive way (vit_b)")
    parser.add_argument("--tiny-naive-points", type=int, default=200)
    parser.add_argument("--growth", default="250,500,1000,2000,4000", help="point counts (tiny)")
    parser.add_argument("--vitb-growth", default="250,500", help="point counts (vit_b)")
    parser.add_argument("--memory-tiles", type=int, default=2, help="vit_b memory run: stop after K tiles (0: all)")
    parser.add_argument("--repeats", type=int, default=2, help="same-work batched and floor runs: best of")
    parser.add_argument("--sections", default="same,growth,decoder,default",
                        help="same (batched vs floor vs naive), growth, decoder (per-prompt decoder cost by batch "
                             "size), default (tiled run / vit_b memory run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dpmo.json"))
    parser.add_argument("--worker-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_model:
        memory_worker(args)
        return

    rgb, points = load_image(args.image)
    sections = set(args.sections.split(","))
    cfg_single = DpmoConfig(tile=False)
    results = {"image": f"ucf_cc_50/{args.image}.jpg", "image_hw": list(rgb.shape[:2]), "heads": len(points),
               "device": args.device, "torch_threads": torch.get_num_threads(), "chunk": args.chunk,
               "load_average_start": os.getloadavg()[0], "models": {}}
    for model_type in args.models.split(","):
        t0 = time.perf_counter()
        model = build_sam(model_type, device=args.device)
        predictor = BatchedSamPredictor(model, args.chunk)
        warm_up(predictor)
        m = len(points) if model_type == "tiny" else args.vitb_points
        k = args.tiny_naive_points if model_type == "tiny" else args.naive_points
        entry = {}
        if "same" in sections:
            pts = subset(points, m)                   # vit_b: a contiguous patch of the crowd
            print(f"[{model_type}] same work on {len(pts)} points ...", flush=True)
            b = batched(predictor, rgb, pts, cfg_single, args.repeats)
            floor_dec = min(sam_decoder_pass(model, rgb, pts, cfg_single, args.chunk) for _ in range(args.repeats))
            nv = naive(model, rgb, pts, cfg_single, k)
            naive_total = nv["encoder_s"] + nv["per_point_s"] * len(pts)
            entry["same_work"] = {
                "points": len(pts), "batched": b, "sam_decoder_pass_s": floor_dec,
                "floor_s": b["encoder_s"] + floor_dec, "total_over_floor": b["total_s"] / (b["encoder_s"] + floor_dec),
                "naive": {**nv, "total_extrapolated_s": naive_total},
                "speedup_vs_naive": naive_total / b["total_s"],
                "speedup_vs_naive_excluding_encoder": (nv["per_point_s"] * len(pts)) / (b["total_s"] - b["encoder_s"])}
        sizes = [int(s) for s in (args.growth if model_type == "tiny" else args.vitb_growth).split(",") if s]
        sizes = sizes if "growth" in sections else []
        growth = []
        for n in sizes:
            print(f"[{model_type}] growth {n} points ...", flush=True)
            g = batched(predictor, rgb, subset(points, n), cfg_single)
            growth.append({**g, "per_point_ms": 1000 * (g["total_s"] - g["encoder_s"]) / g["points"]})
        entry["growth"] = growth
        if "decoder" in sections:
            print(f"[{model_type}] decoder per prompt by batch size ...", flush=True)
            entry["decoder"] = decoder_scaling(model, args.device)
        if "default" not in sections:
            pass
        elif model_type == "tiny":
            print("[tiny] default settings (tiled) on all points ...", flush=True)
            entry["tiled_all_points"] = batched(predictor, rgb, points, DpmoConfig())
            entry["tiled_all_points"]["peak_rss_mb_process"] = peak_rss_mb()
        else:
            print(f"[{model_type}] memory run (tiled, all {len(points)} points, child process) ...", flush=True)
            entry["memory"] = memory_run(args, model_type)
        entry["wall_s"] = time.perf_counter() - t0
        results["models"][model_type] = entry
        del model, predictor
    results["load_average_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\nimage {results['image']} {results['image_hw']}, {results['heads']} heads, device {results['device']}, "
          f"chunk {results['chunk']}, load average {results['load_average_start']:.1f} -> {results['load_average_end']:.1f}")
    print(f"{'model':6} {'points':>6} {'encoder s':>9} {'decoder s':>9} {'post s':>7} {'total s':>8} "
          f"{'floor s':>8} {'tot/floor':>9} {'naive s*':>9} {'speedup':>7} {'excl. encoder':>13}")
    for name, e in results["models"].items():
        if "same_work" not in e:
            continue
        s = e["same_work"]
        b = s["batched"]
        print(f"{name:6} {s['points']:>6} {b['encoder_s']:>9.2f} {b['decoder_s']:>9.2f} {b['post_s']:>7.2f} "
              f"{b['total_s']:>8.2f} {s['floor_s']:>8.2f} {s['total_over_floor']:>9.2f} "
              f"{s['naive']['total_extrapolated_s']:>9.2f} {s['speedup_vs_naive']:>6.1f}x "
              f"{s['speedup_vs_naive_excluding_encoder']:>12.1f}x")
    print("* naive: SamPredictor's encoder + the median per-point time of the first K points x M")
    print(f"\n{'model':6} {'points':>6} {'total s':>8} {'encoder s':>9} {'ms/point (excl. encoder)':>25}")
    for name, e in results["models"].items():
        for g in e["growth"]:
            print(f"{name:6} {g['points']:>6} {g['total_s']:>8.2f} {g['encoder_s']:>9.2f} {g['per_point_ms']:>25.2f}")
    print(f"\n{'model':6} {'decoder ms per prompt':<28} {'B=1':>7} {'B=16':>7} {'B=64':>7}")
    for name, e in results["models"].items():
        if "decoder" not in e:
            continue
        d = e["decoder"]
        print(f"{name:6} {'SAM mask_decoder, B=1':<28} {d['sam_decoder_b1_ms']:>7.2f}")
        for label, key in (("ours, float32", "ours_ms"), ("ours, bf16 autocast", "ours_bf16_ms"),
                           ("ours, torch.compile", "ours_compiled_ms")):
            print(f"{name:6} {label:<28} " + " ".join(f"{v:>7.2f}" for v in d[key].values()))
    for name, e in results["models"].items():
        if "tiled_all_points" in e:
            t = e["tiled_all_points"]
            print(f"\n{name}: default settings on all points: {t['tiles']} tiles ({t['tiles_encoded']} encoded), "
                  f"total {t['total_s']:.1f} s (encoder {t['encoder_s']:.1f}, decoder {t['decoder_s']:.1f}, post {t['post_s']:.1f})")
        if "memory" in e:
            mem = e["memory"]
            print(f"{name}: memory run on {mem['points']} heads: peak RSS {mem['peak_rss_mb']:.0f} MB "
                  f"(after model load {mem['rss_after_model_mb']:.0f} MB), {mem['tiles_encoded']} tiles encoded"
                  + (f" of {mem['tiles_with_points']} (stopped early)" if mem["stopped_early"] else "")
                  + (f", CUDA max allocated {mem['cuda_max_allocated_mb']:.0f} MB" if mem["cuda_max_allocated_mb"] else ""))


if __name__ == "__main__":
    main()
