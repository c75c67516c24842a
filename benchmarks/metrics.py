"""Benchmark: NWPU localization evaluation, sparse matching vs. a plain dense implementation.

Over the whole NWPU-Crowd validation ground truth (500 images, 196,238 heads) and each of the
four published prediction files, the TP/FP/FN (sigma_s and sigma_l, per level) are computed two
ways, side by side in one run:

- sparse (crowdseg.metrics): k-d tree candidate edges within each head's radius, then a maximum
  matching on the sparse graph; no N x M matrix. Two matchings: Hopcroft-Karp (the default of
  `LocalizationMetrics`) and the official code's tie-breaking (the default of `eval-loc`).
- dense (baseline): per image the full P x G distance matrix (scipy cdist), the boolean
  `distance <= sigma` matrix, and scipy's maximum matching (Hopcroft-Karp) on it.

All three must give identical TP/FP/FN (checked); per-level counts may differ by a few heads
between different maximum matchings (reported). Time is the best of `--repeats` runs without
tracing; peak memory is measured twice, in separate runs: tracemalloc (numpy buffers and
Python objects, not the k-d tree's C++ nodes) and the growth of the peak resident set size (VmHWM, reset after
parsing) of a fresh child process over its size after parsing (everything, page-granular; Linux). File parsing is shared and timed separately; `eval_loc_s` is the whole
`crowdseg eval-loc` evaluation (parse + match) in-process.

A second, smaller part times COCO mask AP on a synthetic crowd (discs around random points,
cut by their Voronoi cells, predictions shifted by one pixel with random scores) with the two
backends of `crowdseg.metrics.mask_ap`: faster-coco-eval (the default) and pycocotools; both
must give the same numbers.

Usage: .venv/bin/python benchmarks/metrics.py [--repeats 3] [--mask-ap-images 4] [--mask-ap-people 1000]
       [--out benchmarks/results/metrics.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from rich.console import Console
from rich.table import Table
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from tqdm import tqdm

from crowdseg.io import write_json_atomic
from crowdseg.metrics.eval_loc import evaluate_localization_files
from crowdseg.metrics.mask_ap import build_coco_gt, coco_mask_ap, detections_from_id_map, id_map_to_rles
from crowdseg.metrics.localization import NUM_LEVELS, LocalizationCounts, localization_counts
from crowdseg.metrics.nwpu import read_gt_file, read_pred_file

ROOT = Path(__file__).resolve().parents[1]
NWPU = ROOT.parent / "shared" / "data" / "nwpu_crowd_val_localization"
PRED_FILES = ["Raz_loc_val_0.5.txt", "TinyFaces_loc_0.8_0.3.txt", "VGG+GPR_val_k15.txt", "fasterRCNN_val_0.8_0.3.txt"]
SIZE_BUCKETS = [(0, 500), (500, 2000), (2000, 5000), (5000, 10 ** 9)]


def dense_counts(pred: np.ndarray, gt: np.ndarray, radii: np.ndarray, levels: np.ndarray) -> LocalizationCounts:
    """The baseline: full distance matrix, boolean matrix per radius, maximum matching on it."""
    num_pred, num_gt = pred.shape[0], gt.shape[0]
    counts = LocalizationCounts.zeros(radii.shape[1], NUM_LEVELS)
    distance = cdist(pred, gt) if num_pred and num_gt else np.zeros((num_pred, num_gt))
    for t in range(radii.shape[1]):
        allowed = distance <= radii[None, :, t]
        if allowed.any():
            match = maximum_bipartite_matching(sp.csr_matrix(allowed), perm_type="row")  # per GT column
        else:
            match = np.full(num_gt, -1)
        matched = match >= 0
        tp = int(matched.sum())
        counts.tp[t], counts.fp[t], counts.fn[t] = tp, num_pred - tp, num_gt - tp
        counts.tp_level[t] = np.bincount(levels[matched], minlength=NUM_LEVELS)[:NUM_LEVELS]
        counts.fn_level[t] = np.bincount(levels[~matched], minlength=NUM_LEVELS)[:NUM_LEVELS]
    return counts


def sparse_counts(pred, gt, radii, levels) -> LocalizationCounts:
    return localization_counts(pred, gt, radii, levels, matching="hopcroft-karp")


def official_counts(pred, gt, radii, levels) -> LocalizationCounts:
    return localization_counts(pred, gt, radii, levels, matching="official")


def evaluate(method, gt, pred) -> tuple[LocalizationCounts, dict[int, float]]:
    total = LocalizationCounts.zeros()
    per_image = {}
    empty = np.zeros((0, 2))
    for image_id, heads in gt.items():
        start = time.perf_counter()
        total = total + method(pred.get(image_id, empty), heads.points, heads.radii, heads.levels)
        per_image[image_id] = time.perf_counter() - start
    return total, per_image


def timed(method, gt, pred, repeats):
    best, per_image, counts = float("inf"), None, None
    for _ in range(repeats):
        start = time.perf_counter()
        counts, times = evaluate(method, gt, pred)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, per_image = elapsed, times
    return counts, best, per_image


def traced_peak(method, gt, pred) -> int:
    tracemalloc.start()
    try:
        evaluate(method, gt, pred)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


METHODS = {"sparse": sparse_counts, "official": official_counts, "dense": dense_counts}


def rss_growth_mib(method: str, pred_file: str) -> float:
    """Peak RSS growth (MiB) of one full evaluation in a fresh process, beyond parsing."""
    out = subprocess.run([sys.executable, __file__, "--child-rss", method, pred_file],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_growth_mib"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_rss(method: str, pred_file: str) -> None:
    gt, pred = read_gt_file(NWPU / "val_gt_loc.txt"), read_pred_file(NWPU / pred_file)
    evaluate(METHODS[method], dict(list(gt.items())[:1]), pred)  # warm up imports and caches
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    evaluate(METHODS[method], gt, pred)
    print(json.dumps({"rss_growth_mib": (_status_kib("VmHWM") - before) / 1024}))


def synthetic_crowd(rng: np.random.Generator, people: int, size: int = 512, radius: float = 8.0) -> np.ndarray:
    """(size, size) id map: a disc around each random point, cut by its Voronoi cell."""
    points = rng.uniform(0, size, size=(people, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    distance, nearest = cKDTree(points).query(np.stack([xx.ravel(), yy.ravel()], axis=1))
    return np.where(distance < radius, nearest + 1, 0).reshape(size, size)


def mask_ap_backends(images: int, people: int) -> dict:
    rng = np.random.default_rng(0)
    gt_maps = [synthetic_crowd(rng, people) for _ in range(images)]
    infos = [{"id": k + 1, "height": m.shape[0], "width": m.shape[1]} for k, m in enumerate(gt_maps)]
    gt = build_coco_gt(infos, [id_map_to_rles(m)[1] for m in gt_maps])
    detections = []
    for k, m in enumerate(gt_maps):
        detections += detections_from_id_map(k + 1, np.roll(m, 1, axis=1), rng.uniform(size=people))
    result = {"images": images, "people_per_image": people, "detections": len(detections)}
    for backend in ("faster", "pycocotools"):
        start = time.perf_counter()
        result[backend] = coco_mask_ap(gt, detections, backend=backend)
        result[f"{backend}_s"] = time.perf_counter() - start
    if result["faster"] != result["pycocotools"]:
        raise SystemExit(f"mask AP backends differ: {result['faster']} vs {result['pycocotools']}")
    result["speedup"] = result["pycocotools_s"] / result["faster_s"]
    return result


def same_totals(a: LocalizationCounts, b: LocalizationCounts) -> bool:
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("tp", "fp", "fn"))


def level_moves(a: LocalizationCounts, b: LocalizationCounts) -> int:
    """Heads counted at a different level between two maximum matchings (sum over both radii)."""
    return int(np.abs(a.tp_level - b.tp_level).sum() // 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metrics.json"))
    parser.add_argument("--mask-ap-images", type=int, default=4)
    parser.add_argument("--mask-ap-people", type=int, default=1000)
    parser.add_argument("--child-rss", nargs=2, metavar=("METHOD", "PRED_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        child_rss(*args.child_rss)
        return 0

    start = time.perf_counter()
    gt = read_gt_file(NWPU / "val_gt_loc.txt")
    parse_gt_s = time.perf_counter() - start
    rows, scaling = [], []
    for name in tqdm(PRED_FILES, desc="prediction files", file=sys.stderr):
        start = time.perf_counter()
        pred = read_pred_file(NWPU / name)
        parse_pred_s = time.perf_counter() - start
        start = time.perf_counter()
        report = evaluate_localization_files(NWPU / "val_gt_loc.txt", NWPU / name)
        eval_loc_s = time.perf_counter() - start
        sparse, sparse_s, sparse_times = timed(sparse_counts, gt, pred, args.repeats)
        official, official_s, _ = timed(official_counts, gt, pred, args.repeats)
        dense, dense_s, dense_times = timed(dense_counts, gt, pred, args.repeats)
        if not (same_totals(sparse, dense) and same_totals(official, dense)):
            raise SystemExit(f"{name}: TP/FP/FN differ: sparse {sparse}, official {official}, dense {dense}")
        sparse_peak, dense_peak = traced_peak(sparse_counts, gt, pred), traced_peak(dense_counts, gt, pred)
        official_peak = traced_peak(official_counts, gt, pred)
        rss = {m: rss_growth_mib(m, name) for m in METHODS}
        cells = max(pred.get(i, np.zeros((0, 2))).shape[0] * h.count for i, h in gt.items())
        rows.append({
            "file": name, "images": len(gt), "gt_heads": report["gt_heads"], "pred_points": report["pred_points"],
            "sigma_l_f1": report["sigma_l"]["f1"], "sigma_s_f1": report["sigma_s"]["f1"],
            "sparse_s": sparse_s, "official_s": official_s, "dense_s": dense_s, "speedup": dense_s / sparse_s,
            "speedup_official": dense_s / official_s,
            "sparse_peak_mib": sparse_peak / 2 ** 20, "official_peak_mib": official_peak / 2 ** 20,
            "dense_peak_mib": dense_peak / 2 ** 20, "memory_ratio": dense_peak / sparse_peak,
            "sparse_rss_growth_mib": rss["sparse"], "official_rss_growth_mib": rss["official"],
            "dense_rss_growth_mib": rss["dense"], "largest_dense_matrix_cells": cells, "parse_pred_s": parse_pred_s, "eval_loc_s": eval_loc_s,
            "tp_fp_fn_identical": True, "level_moves_hk_vs_official": level_moves(sparse, official),
            "level_moves_dense_vs_official": level_moves(dense, official),
        })
        for lo, hi in SIZE_BUCKETS:
            ids = [i for i, h in gt.items() if lo <= h.count < hi]
            s = sum(sparse_times[i] for i in ids)
            d = sum(dense_times[i] for i in ids)
            scaling.append({"file": name, "gt_heads_from": lo, "gt_heads_to": hi if hi < 10 ** 9 else None,
                            "images": len(ids), "sparse_s": s, "dense_s": d, "speedup": d / s if s else None})

    console = Console(width=200)
    table = Table(title=f"NWPU val localization: sparse vs dense matching (best of {args.repeats})")
    for col in ("predictions", "points", "F1 sigma_l", "sparse HK s", "sparse official s", "dense s",
                "speedup HK", "speedup official", "traced MiB HK / official / dense",
                "RSS growth MiB HK / official / dense", "eval-loc s"):
        table.add_column(col, justify="left" if col == "predictions" else "right")
    for r in rows:
        table.add_row(r["file"], str(r["pred_points"]), f"{r['sigma_l_f1']:.4f}", f"{r['sparse_s']:.2f}",
                      f"{r['official_s']:.2f}", f"{r['dense_s']:.2f}", f"{r['speedup']:.1f}x",
                      f"{r['speedup_official']:.1f}x",
                      f"{r['sparse_peak_mib']:.1f} / {r['official_peak_mib']:.1f} / {r['dense_peak_mib']:.1f}",
                      f"{r['sparse_rss_growth_mib']:.1f} / {r['official_rss_growth_mib']:.1f} / "
                      f"{r['dense_rss_growth_mib']:.1f}", f"{r['eval_loc_s']:.2f}")
    console.print(table)
    grow = Table(title="time by image size (GT heads per image), all four files summed")
    for col in ("GT heads", "images", "sparse s", "dense s", "speedup"):
        grow.add_column(col, justify="right")
    for lo, hi in SIZE_BUCKETS:
        part = [s for s in scaling if s["gt_heads_from"] == lo]
        s, d = sum(p["sparse_s"] for p in part), sum(p["dense_s"] for p in part)
        grow.add_row(f"{lo}-{hi if hi < 10 ** 9 else ''}", str(part[0]["images"]), f"{s:.2f}", f"{d:.2f}",
                     f"{d / s:.1f}x" if s else "-")
    console.print(grow)

    mask_ap = mask_ap_backends(args.mask_ap_images, args.mask_ap_people)
    ap_table = Table(title=f"COCO mask AP, synthetic crowd: {mask_ap['images']} images x "
                           f"{mask_ap['people_per_image']} people (maxDets 100/1000/5000)")
    for col in ("backend", "seconds", "AP", "AP50", "AP75", "AR@100", "AR@5000"):
        ap_table.add_column(col, justify="left" if col == "backend" else "right")
    for backend in ("faster", "pycocotools"):
        r = mask_ap[backend]
        ap_table.add_row(backend, f"{mask_ap[backend + '_s']:.2f}", f"{r['ap']:.4f}", f"{r['ap50']:.4f}",
                         f"{r['ap75']:.4f}", f"{r['ar_100']:.4f}", f"{r['ar_5000']:.4f}")
    console.print(ap_table)
    console.print(f"faster-coco-eval speedup: {mask_ap['speedup']:.1f}x, identical numbers")

    result = {
        "command": "python benchmarks/metrics.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "repeats": args.repeats, "parse_gt_s": parse_gt_s, "files": rows, "by_image_size": scaling,
        "mask_ap_backends": mask_ap,
    }
    write_json_atomic(args.out, result)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
