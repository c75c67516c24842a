"""`crowdseg eval-loc --gt FILE --pred FILE [--json]`: NWPU-protocol localization and counting.

Evaluates a prediction file against a ground-truth file, both in the NWPU localization text
format (`nwpu.py`), with the same pure functions that the `validate` / `test` metrics
(`torch_metrics.py`) call; it does not import torch, so it starts fast. Images missing
from the prediction file count as zero predictions; a prediction for an image that is not in
the ground truth is an error (it usually means the wrong split).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from crowdseg.errors import DataError
from crowdseg.metrics.counting import counting_errors
from crowdseg.metrics.localization import LocalizationCounts, localization_counts, localization_summary
from crowdseg.metrics.nwpu import read_gt_file, read_pred_file


def evaluate_localization_files(gt_path: str | os.PathLike, pred_path: str | os.PathLike,
                                progress: bool = False, matching: str = "official") -> dict[str, Any]:
    """Evaluate an NWPU prediction file against a GT file.

    `matching="official"` takes the same maximum matching as the official NWPU code, so even the
    per-level recalls are identical to it; "hopcroft-karp" has a better worst case and gives the
    same P/R/F1.

    Returns {"sigma_s": {"precision", "recall", "f1", "tp", "fp", "fn", "recall_per_level",
    "recall_level_mean"}, "sigma_l": {...}, "mae", "rmse", "mse" (= rmse), "nae", "images",
    "gt_heads", "pred_points", "images_without_prediction"}; rates are fractions in [0, 1].
    """
    gt = read_gt_file(gt_path)
    pred = read_pred_file(pred_path)
    unknown = [image_id for image_id in pred if image_id not in gt]
    if unknown:
        raise DataError(f"{pred_path}: image {unknown[0]} is not in the ground truth {gt_path} "
                        f"({len(unknown)} such images; wrong split?)")
    counts = LocalizationCounts.zeros()
    pred_counts, gt_counts = [], []
    empty = np.zeros((0, 2))
    for image_id, heads in tqdm(gt.items(), desc="eval-loc", unit="img", disable=not progress,
                                file=sys.stderr):
        points = pred.get(image_id, empty)
        counts = counts + localization_counts(points, heads.points, heads.radii, heads.levels, matching=matching)
        pred_counts.append(points.shape[0])
        gt_counts.append(heads.count)
    report: dict[str, Any] = dict(localization_summary(counts))
    report.update(counting_errors(pred_counts, gt_counts))
    report["images"] = len(gt)
    report["gt_heads"] = sum(h.count for h in gt.values())
    report["pred_points"] = sum(p.shape[0] for i, p in pred.items())
    report["images_without_prediction"] = sum(1 for i in gt if i not in pred)
    return report


def print_report(report: dict[str, Any], title: str = "") -> None:
    """Rich tables: P/R/F1 (in %) per radius, per-level recall and the counting errors."""
    from rich.console import Console
    from rich.table import Table

    names = ("sigma_s", "sigma_l")
    main = Table(title=title or None)
    for col in ("radius", "P (%)", "R (%)", "F1 (%)", "TP", "FP", "FN"):
        main.add_column(col, justify="left" if col == "radius" else "right")
    for name in names:
        r = report[name]
        main.add_row(name, f"{100 * r['precision']:.2f}", f"{100 * r['recall']:.2f}", f"{100 * r['f1']:.2f}",
                     str(r["tp"]), str(r["fp"]), str(r["fn"]))
    num_levels = len(report[names[0]]["recall_per_level"])
    levels = Table(title="recall per head level (%)")
    levels.add_column("radius")
    for k in range(num_levels):
        levels.add_column(f"L{k}", justify="right")
    levels.add_column("mean", justify="right")
    for name in names:
        r = report[name]
        levels.add_row(name, *(f"{100 * v:.1f}" for v in r["recall_per_level"]), f"{100 * r['recall_level_mean']:.2f}")
    counts = Table(title="counting")
    for col in ("images", "GT heads", "predicted", "MAE", "RMSE (\"MSE\")", "NAE"):
        counts.add_column(col, justify="right")
    counts.add_row(str(report["images"]), str(report["gt_heads"]), str(report["pred_points"]),
                   f"{report['mae']:.3f}", f"{report['rmse']:.3f}", f"{report['nae']:.4f}")
    console = Console()
    for table in (main, levels, counts):
        console.print(table)
    if report.get("images_without_prediction"):
        console.print(f"{report['images_without_prediction']} images had no line in the prediction "
                      "file and count as zero predictions.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdseg eval-loc",
        description="NWPU-Crowd localization (P/R/F1 at sigma_s and sigma_l) and counting "
                    "(MAE, RMSE a.k.a. MSE, NAE) of a prediction file against a ground-truth file.")
    parser.add_argument("--gt", required=True, help="ground truth: `id num x y sigma_s sigma_l level ...` per line")
    parser.add_argument("--pred", required=True, help="predictions: `id num x y ...` per line")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--matching", choices=("official", "hopcroft-karp"), default="official",
                        help="which maximum matching: the official code's (default; per-level recall "
                             "identical to it) or Hopcroft-Karp (same P/R/F1, better worst case)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `crowdseg eval-loc`; a bad input file raises `DataError`, which `crowdseg.cli` reports."""
    args = build_parser().parse_args(argv)
    report = evaluate_localization_files(args.gt, args.pred, progress=not args.json, matching=args.matching)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, title=f"{os.path.basename(args.pred)} vs {os.path.basename(args.gt)}")
    return 0
