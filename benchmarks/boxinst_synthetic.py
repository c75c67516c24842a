"""The BoxInst "must show" experiment on the occlusion-heavy synthetic crowd (docs/boxinst.md).

Per seed: train experiments/boxinst/synthetic.yaml from boxes only, test it (its masks, and the
box baseline: each detected box filled as its mask), then fine-tune it for the same steps with
OverlapLoss (synthetic_overlap.yaml) and without it (synthetic_finetune.yaml), and test both.
Each run's test metrics are appended to benchmarks/results/boxinst_synthetic.json as they finish;
`--summary` prints mean +- std over the seeds found there.

    OMP_NUM_THREADS=1 python benchmarks/boxinst_synthetic.py --seeds 0 1 2
    python benchmarks/boxinst_synthetic.py --summary
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments" / "boxinst"
RESULTS = ROOT / "benchmarks" / "results" / "boxinst_synthetic.json"
if "--results" in sys.argv:  # a quick check writes elsewhere
    RESULTS = Path(sys.argv[sys.argv.index("--results") + 1])
KEYS = ("mask_ap", "mask_ap50", "mask_ap75", "box_ap", "box_ap50", "overlap", "overlapping", "detections")


def _trainer(cfg, run_dir: Path, max_steps: int):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=CSVLogger(run_dir),
                     enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=20,
                     gradient_clip_val=cfg.optim.grad_clip)


def _test(trainer, job, box_masks: bool = False) -> dict[str, float]:
    job.module.settings.box_masks = box_masks
    trainer.test(job.module, datamodule=job.datamodule, verbose=False)
    job.module.settings.box_masks = False
    return {k[len("test/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def run(experiment: str, seed: int, out: Path, overrides: list[str], load_config) -> tuple[dict, Path]:
    import lightning as L
    from crowdseg.methods.boxinst import build

    cfg = load_config(EXPERIMENTS / f"{experiment}.yaml", [f"seed={seed}", *overrides])
    run_dir = out / f"{experiment}_seed{seed}"
    L.seed_everything(seed, workers=True, verbose=False)
    job = build(cfg, run_dir)
    trainer = _trainer(cfg, run_dir, cfg.trainer.max_steps)
    start = time.time()
    trainer.fit(job.module, datamodule=job.datamodule)
    seconds = time.time() - start
    ckpt = run_dir / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    record = {"experiment": experiment, "seed": seed, "steps": trainer.global_step, "train_seconds": round(seconds, 1),
              "test": _test(trainer, job)}
    if experiment == "synthetic":
        record["test_box_baseline"] = _test(trainer, job, box_masks=True)
    _append(record)
    return record, ckpt


def _append(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    records = [r for r in records if (r["experiment"], r["seed"]) != (record["experiment"], record["seed"])]
    RESULTS.write_text(json.dumps(records + [record], indent=1))
    print(json.dumps(record), flush=True)


def summary() -> None:
    records = json.loads(RESULTS.read_text())
    rows = [("BoxInst (boxes only)", "synthetic", "test"), ("box baseline (boxes filled)", "synthetic", "test_box_baseline"),
            ("fine-tune, no OverlapLoss", "synthetic_finetune", "test"), ("fine-tune + OverlapLoss", "synthetic_overlap", "test")]
    print(f"{'run':30s} {'seeds':>5s} " + " ".join(f"{k:>15s}" for k in KEYS))
    for label, experiment, part in rows:
        found = [r[part] for r in records if r["experiment"] == experiment and part in r]
        if not found:
            continue
        cells = []
        for k in KEYS:
            values = [f[k] for f in found if k in f]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:7.3f}+-{std:5.3f}")
        print(f"{label:30s} {len(found):5d} " + " ".join(f"{c:>15s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "boxinst_synthetic")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON the runs are appended to")
    parser.add_argument("--only", choices=("base", "finetune"), default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run (e.g. a quick check: "
                                                     "trainer.max_steps=2 data.synthetic.num_test=2)")
    args = parser.parse_args()
    if args.summary:
        summary()
        return
    from crowdseg.config.load import load_config
    for seed in args.seeds:
        ckpt = args.out / f"synthetic_seed{seed}" / "last.ckpt"
        if args.only != "finetune":
            _, ckpt = run("synthetic", seed, args.out, list(args.overrides), load_config)
        if args.only != "base":
            for experiment in ("synthetic_overlap", "synthetic_finetune"):
                run(experiment, seed, args.out, [*args.overrides, f"boxinst.init_ckpt={ckpt}"], load_config)


if __name__ == "__main__":
    sys.exit(main())
