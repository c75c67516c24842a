"""BoxInst + OverlapLoss on real photos of people (coco_persons, docs/boxinst.md), with the framework's
own commands (a killed run resumes when the script is rerun):

- `base`: `crowdseg fit experiments/boxinst/coco_persons.yaml` from a random start, then `crowdseg test`
  of its val-selected best.ckpt on coco_mini's val images (never used for training or selection);
- `synstart`: the same recipe started from a synthetic BoxInst run (`--synthetic-ckpt`, the same
  architecture): does a synthetic start help the real run?
- `finetune`: from the base run's best.ckpt, the OverlapLoss fine-tune on the images with overlapping
  people (coco_persons_overlap.yaml) and its control without the loss, each tested at its best.ckpt.

The test metrics name what is compared: `mask_*` (the detections' predicted masks) beside `boxfill_*`
(the same detections, each box filled), `gtbox_*` (the masks predicted for the ground-truth boxes)
beside `gtboxfill_*` (the ground-truth boxes filled). `--summary` writes the table (mean +- std over
seeds) and the per-seed numbers to benchmarks/results/boxinst_coco_persons.json. `--retest-last` also
scores each base run's last.ckpt (the end of its cosine schedule, no selection) into
`metrics/test_last.json`. The synthetic start is compared with the base runs on their shared val grid
(`val_at_equal_steps`): it may be stopped early, at equal steps the two schedules are the same.

    OMP_NUM_THREADS=2 python benchmarks/boxinst_coco_persons.py --seeds 0 1 2
    python benchmarks/boxinst_coco_persons.py --summary --figure docs/figures/boxinst_coco_persons.png
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench_runs import ROOT, crowdseg, fit_and_test, seed_metrics, seed_of, write_results

EXPERIMENTS = ROOT / "experiments" / "boxinst"
RESULTS = ROOT / "benchmarks" / "results" / "boxinst_coco_persons.json"
SYNTHETIC = ROOT / "runs" / "boxinst" / "synthetic" / "boxinst-synthetic-lf100-s0" / "checkpoints" / "last.ckpt"
# (label, arm, metric prefix, metrics file): best.ckpt's test.json, or last.ckpt's test_last.json
ROWS = (("BoxInst, detections' masks", "base", "", "test"),
        ("the same detections, boxes filled", "base", "boxfill_", "test"),
        ("BoxInst, masks on GT boxes", "base", "gtbox_", "test"),
        ("GT boxes filled", "base", "gtboxfill_", "test"),
        ("BoxInst at last.ckpt, detections' masks", "base", "", "test_last"),
        ("BoxInst at last.ckpt, masks on GT boxes", "base", "gtbox_", "test_last"),
        ("fine-tune without OverlapLoss", "finetune", "", "test"),
        ("fine-tune with OverlapLoss", "overlap", "", "test"))
KEYS = ("mask_ap", "mask_ap50", "mask_ap75", "mask_iou", "overlap")


def run_dir(out: Path, arm: str, seed: int | str) -> Path:
    return out / "boxinst" / EXPERIMENT[arm] / f"{arm}_seed{seed}"


EXPERIMENT = {"base": "coco_persons", "synstart": "coco_persons", "overlap": "coco_persons_overlap",
              "finetune": "coco_persons_overlap"}


def train_and_test(arm: str, seed: int, out: Path, overrides: list[str]) -> None:
    fit_and_test("boxinst_coco_persons", EXPERIMENTS / f"{EXPERIMENT[arm]}.yaml", f"{arm}_seed{seed}", seed, out,
                 overrides)


def arm_overrides(arm: str, seed: int, out: Path, synthetic: Path) -> list[str]:
    if arm == "synstart":
        return [f"boxinst.init_ckpt={synthetic}"]
    if arm in ("overlap", "finetune"):
        base = run_dir(out, "base", seed) / "checkpoints" / "best.ckpt"
        return [f"boxinst.init_ckpt={base}"] + (["boxinst.loss.overlap_weight=0"] if arm == "finetune" else [])
    return []


def retest_last(out: Path, seed: int) -> None:
    """`crowdseg test --ckpt last.ckpt` of the base run, kept as metrics/test_last.json (test.json stays
    the val-selected best.ckpt's)."""
    metrics_dir = run_dir(out, "base", seed) / "metrics"
    best = (metrics_dir / "test.json").read_text()
    crowdseg("boxinst_coco_persons", "test", "--ckpt", run_dir(out, "base", seed) / "checkpoints" / "last.ckpt")
    (metrics_dir / "test.json").replace(metrics_dir / "test_last.json")
    (metrics_dir / "test.json").write_text(best)


def val_rows(out: Path, arm: str) -> dict[int, dict[int, dict[str, float]]]:
    """{seed: {step: val metrics}} of the validations in the runs' metrics.csv."""
    from crowdseg.report import val_history

    return {seed_of(run): {step: {k.split("/", 1)[1]: v for k, v in m.items()} for step, m in val_history(run).items()
                           if "val/gtbox_mask_iou" in m}
            for run in sorted(out.glob(str(run_dir(Path(), arm, "*")))) if (run / "csv" / "metrics.csv").is_file()}


def val_at_equal_steps(out: Path, keys=("gtbox_mask_iou", "gtboxfill_mask_iou", "mask_ap50", "box_ap50")) -> dict:
    """The synthetic start beside the base run of the same seed at every step both validated."""
    base, start = val_rows(out, "base"), val_rows(out, "synstart")
    return {f"seed{seed}": {str(step): {"random start": {k: base[seed][step][k] for k in keys},
                                        "synthetic start": {k: rows[step][k] for k in keys}}
                            for step in sorted(rows) if step in base.get(seed, {})}
            for seed, rows in start.items()}


def metrics(out: Path, arm: str, stage: str) -> dict[int, dict[str, float]]:
    """{seed: {metric: value}} of the runs of `arm` with a `metrics/<stage>.json`."""
    return seed_metrics(out.glob(str(run_dir(Path(), arm, "*"))), stage)


def _cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {std:.3f}"


def summary(out: Path) -> str:
    """Markdown table of the test metrics: mean +- std over the seeds found, per row of ROWS."""
    lines = ["| run (test: coco_mini val, 79 images) | seeds | " + " | ".join(KEYS) + " |",
             "|---|---:|" + "---:|" * len(KEYS)]
    for label, arm, prefix, stage in ROWS:
        found = metrics(out, arm, stage)
        if not found:
            continue
        cells = []
        for key in KEYS:
            name = prefix + key if key.startswith("mask_") else key
            values = [m[name] for m in found.values() if name in m]
            shown = values and not (key == "overlap" and prefix)   # the overlap is of the detections' masks
            cells.append(_cell(values) if shown else "")
        lines.append(f"| {label} | {','.join(map(str, sorted(found)))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(out: Path) -> dict[str, dict]:
    """Per seed of the base runs: the issue's two targets, with their margins."""
    per_seed = {}
    for seed, m in metrics(out, "base", "test").items():
        gt_margin = m["gtbox_mask_iou"] - m["gtboxfill_mask_iou"]
        e2e_margin = m["mask_ap50"] - m["boxfill_mask_ap50"]
        per_seed[str(seed)] = {"gt_box_iou_margin": round(gt_margin, 4), "gt_box_target_met": gt_margin >= 0.10,
                               "end_to_end_ap50_margin": round(e2e_margin, 4), "end_to_end_target_met": e2e_margin > 0}
    return per_seed


def val_curves(out: Path, ax_iou, ax_ap) -> None:
    import csv

    for number, csv_path in enumerate(sorted(out.glob(str(run_dir(Path(), "base", "*") / "csv" / "metrics.csv")))):
        seed = csv_path.parent.parent.name.rsplit("seed", 1)[1]
        with open(csv_path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/gtbox_mask_iou")]
        steps = [int(r["step"]) + 1 for r in rows]
        color = f"C{number}"
        ax_iou.plot(steps, [float(r["val/gtbox_mask_iou"]) for r in rows], color=color, label=f"masks, seed {seed}")
        ax_iou.plot(steps, [float(r["val/gtboxfill_mask_iou"]) for r in rows], color=color, ls="--",
                    label=f"filled boxes, seed {seed}")
        ax_ap.plot(steps, [float(r["val/mask_ap50"]) for r in rows], color=color, label=f"masks, seed {seed}")
        ax_ap.plot(steps, [float(r["val/boxfill_mask_ap50"]) for r in rows], color=color, ls="--",
                   label=f"filled boxes, seed {seed}")
    for ax, title in ((ax_iou, "val: mean mask IoU on GT boxes"), (ax_ap, "val: end-to-end mask AP50")):
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax_iou.legend(fontsize=7)


def pictures(out: Path, seed: int, count: int = 4):
    """Rows of (photo with GT instances | masks on GT boxes | GT boxes filled | detections' masks) for the
    test images with the most people, from the base run's best.ckpt."""
    import torch

    from crowdseg.config.load import load_config
    from crowdseg.lit.boxinst import filled_boxes, instance_map
    from crowdseg.methods.boxinst import build
    from crowdseg.models.boxinst import pad_to
    from crowdseg.vis import overlay_masks, to_uint8_image
    from datamodules.types import collate_samples

    ckpt = run_dir(out, "base", seed) / "checkpoints" / "best.ckpt"
    cfg = load_config(EXPERIMENTS / "coco_persons.yaml", [f"seed={seed}"])
    job = build(cfg, None)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    job.module.load_state_dict(state, strict=False)
    module = job.module.eval()
    test = job.datamodule.datasets["test"]
    test = test() if callable(test) else test
    order = sorted(range(len(test)), key=lambda i: -int(test.point_counts[i]))[:count]
    rows = []
    with torch.no_grad():
        for i in order:
            batch = collate_samples([test[i]])
            outputs = module.model(pad_to(batch["image"]))
            truth = module._targets(batch)[0]
            size = tuple(truth.shape)
            on_gt = module.gt_box_masks(batch, outputs, [size])[0]
            detections = module.predict_instances(batch, outputs)[0]
            h, w = batch["image_size"][0].tolist()
            import cv2
            photo = cv2.resize(to_uint8_image(batch["image"][0, :, :h, :w]), (size[1], size[0]))
            ids = lambda masks: instance_map(masks, torch.ones(len(masks)), 0.0).numpy()   # noqa: E731
            rows.append([overlay_masks(photo, truth.numpy()), overlay_masks(photo, ids(on_gt["masks"])),
                         overlay_masks(photo, ids(on_gt["filled"])),
                         overlay_masks(photo, instance_map(detections["masks"], detections["scores"], 0.3).numpy())])
    return rows


def figure(out: Path, path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pictures(out, seed)
    fig = plt.figure(figsize=(13, 3.2 * (len(rows) + 1)))
    grid = fig.add_gridspec(len(rows) + 1, 4)
    val_curves(out, fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2:]))
    titles = ("ground truth (test)", "BoxInst masks on the GT boxes", "GT boxes filled", "detections (score >= 0.3)")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = fig.add_subplot(grid[r + 1, c])
            ax.imshow(image)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
    fig.suptitle(f"BoxInst from boxes on real photos (coco_persons, seed {seed}'s val-selected checkpoint)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=("base", "synstart", "finetune"), default=["base", "finetune"],
                        help="finetune runs the OverlapLoss fine-tune and its control")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "boxinst_coco_persons", help="runs_root of every run")
    parser.add_argument("--synthetic-ckpt", type=Path, default=SYNTHETIC, help="the synthetic run the synstart arm starts from")
    parser.add_argument("--summary", action="store_true", help="write the table of the runs under --out and stop")
    parser.add_argument("--retest-last", action="store_true", help="also test the base runs' last.ckpt (test_last.json)")
    parser.add_argument("--figure", type=Path, default=None, help="also draw val curves and test pictures to this PNG")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.summary:
        for seed in args.seeds:
            for arm in args.arms:
                for run in (("overlap", "finetune") if arm == "finetune" else (arm,)):
                    train_and_test(run, seed, out, [*arm_overrides(run, seed, out, args.synthetic_ckpt), *args.overrides])
    if args.retest_last:
        for seed in args.seeds:
            retest_last(out, seed)
    table = summary(out)
    results = {"table": table.splitlines(), "targets": targets(out), "val_at_equal_steps": val_at_equal_steps(out),
               "test_last": {f"base_seed{seed}": m for seed, m in metrics(out, "base", "test_last").items()},
               "test_metrics": {f"{arm}_seed{seed}": m for arm in EXPERIMENT for seed, m in metrics(out, arm, "test").items()},
               "last_val_metrics": {f"{arm}_seed{seed}": m for arm in EXPERIMENT
                                    for seed, m in metrics(out, arm, "val").items()}}
    write_results(RESULTS, results, len(results["test_metrics"]), out)
    print(table)
    if args.figure is not None:
        figure(out, args.figure, min(metrics(out, "base", "test")))


if __name__ == "__main__":
    sys.exit(main())
