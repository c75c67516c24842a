"""Train the point predictor (p2p) or the density counter on a real crowd dataset, without Lightning.

The diagnostic loop behind docs/p2p_real_data.md: it builds the model and the loss directly (the
same classes the Lightning modules wrap), keeps the decoded, downscaled images in memory, and logs
per evaluation the validation MAE / RMSE, localization F1 at 4 and 8 px, and (p2p) how the person
scores behave: the highest score per image, the number of scores above the threshold, and, around
each GT head, the highest and the summed score of the predictions within 8 px (a model that knows
where the heads are but splits a head's score over several anchors has a high sum and a low max).

Validation: `--val-count` images carved from the training split, the first in the sha256 order of
their file names (fixed, independent of any seed). The test split is never read. With `--ema` the
evaluation runs on an exponential moving average of the weights too (buffers averaged as well, as
Lightning's `EMAWeightAveraging(use_buffers=True)` does).

  OMP_NUM_THREADS=1 python scripts/real_crowd.py --method p2p --dataset shb \
      --root ../shared/data/shanghaitech/part_B --max-size 512 --steps 3000 --out runs/diag/p2p.jsonl

Writes one JSON line per evaluation (and a last "summary" line) to --out; prints them too.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from crowdseg.averaging import warmup_decay
from crowdseg.losses.density import DensityLoss
from crowdseg.losses.p2p import P2PLoss
from crowdseg.metrics.torch_metrics import CountingMetrics, LocalizationMetrics
from crowdseg.models.backbone import create_backbone
from crowdseg.models.density import CSRNET_CHANNELS, DensityCounter, density_count_in_region
from crowdseg.models.p2p import PointPredictor, select_points
from datamodules.dataset import build_dataset
from datamodules.transforms import EvalTransform, TrainTransform
from datamodules.types import collate_samples


def validation_names(names: list[str], count: int) -> list[str]:
    """The `count` names first in sha256 order: a fixed validation split, independent of seeds."""
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count]


def load_cached(dataset: str, root: str, max_size: int | None) -> tuple[list[str], list[dict]]:
    """All training images of `dataset`, decoded and resized once (raw numpy samples)."""
    ds = build_dataset(dataset, root, "train", max_size=max_size, on_bad_annotation="drop", progress=False)
    raws = []
    for i in range(len(ds)):
        raw = ds.load_raw(i)
        raw["image"] = np.ascontiguousarray(raw["image"])
        raws.append(raw)
    return list(ds.names), raws


class EMA:
    """Exponential moving average of a module's parameters and floating-point buffers; with `warmup` the
    decay of the n-th update is min(decay, (1 + n) / (10 + n)) as in crowdseg.averaging (optim.ema_decay)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.model, self.updates, self.warmup = decay, copy.deepcopy(model).eval(), 0, warmup
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = float(warmup_decay(self.decay, torch.tensor(self.updates))) if self.warmup else self.decay
        self.updates += 1
        for ema, cur in zip(list(self.model.parameters()) + list(self.model.buffers()),
                            list(model.parameters()) + list(model.buffers())):
            if ema.dtype.is_floating_point:
                ema.lerp_(cur.detach(), 1.0 - decay)
            else:
                ema.copy_(cur)


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.01) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":  # / 10 at 2/3 of the run
        return 1.0 if progress < 2 / 3 else 0.1
    raise ValueError(schedule)


def build(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    if args.method == "p2p":
        model = PointPredictor(create_backbone(args.backbone, reductions=(8, 16)), fpn_channels=args.fpn_channels,
                               head_channels=args.head_channels, anchor_rows=args.anchors, anchor_cols=args.anchors,
                               cls_prior=args.cls_prior)
        loss = P2PLoss(cost_class=args.cost_class, cost_point=args.cost_point, eos_coef=args.eos_coef,
                       point_loss_coef=args.point_loss_coef, cls_loss=args.cls_loss, focal_gamma=args.focal_gamma,
                       match_on=args.match_on)
    else:
        channels = CSRNET_CHANNELS if args.density_channels is None else tuple(args.density_channels)
        model = DensityCounter(create_backbone(args.backbone, reductions=(8,)), channels=channels)
        loss = DensityLoss(stride=8, sigma=args.sigma)
    return model, loss


SWEEP = (0.3, 0.4, 0.6)
MERGE_RADII = (2.0, 4.0)


@torch.no_grad()
def evaluate(model, samples: list[dict], args) -> dict[str, float]:
    model.eval()
    counting, localization = CountingMetrics(), LocalizationMetrics(fixed_radii=(4.0, 8.0))
    max_scores, above, soft_counts, local_max, local_sum, errors, duplicates = [], [], [], [], [], [], []
    sweep = {t: [] for t in SWEEP}
    merged_errors = {r: [] for r in MERGE_RADII}
    merged_loc = {r: LocalizationMetrics(fixed_radii=(4.0, 8.0)) for r in MERGE_RADII}  # count error at other score thresholds (a diagnostic, not selection)
    for s in samples:
        batch = collate_samples([s])
        gt = batch["points"][0]
        h, w = batch["image_size"][0].tolist()
        if args.method == "p2p":
            out = model(batch["image"])
            (points, scores), = select_points(out["points"], out["logits"], args.threshold)
            inside = (points[:, 0] >= -0.5) & (points[:, 0] < w - 0.5) & (points[:, 1] >= -0.5) & (points[:, 1] < h - 0.5)
            points = points[inside]
            prob = out["logits"].softmax(-1)[0, :, 1]
            count = float(len(points))
            inside_all = ((out["points"][0, :, 0] >= -0.5) & (out["points"][0, :, 0] < w - 0.5)
                          & (out["points"][0, :, 1] >= -0.5) & (out["points"][0, :, 1] < h - 0.5))
            for t in SWEEP:
                sweep[t].append(float(((prob > t) & inside_all).sum()) - len(gt))
            for r in MERGE_RADII:
                (mp, _), = select_points(out["points"][:, inside_all], out["logits"][:, inside_all], args.threshold,
                                         merge_radius=r)
                merged_errors[r].append(len(mp) - len(gt))
                merged_loc[r].update([mp], [gt])
            max_scores.append(float(prob.max()))
            soft_counts.append(float(prob.sum()))
            if len(gt):
                near = torch.cdist(gt, out["points"][0]) <= 8.0  # (N, M)
                masked = torch.where(near, prob[None], torch.zeros_like(prob)[None])
                local_max.append(float(masked.max(1).values.mean()))
                local_sum.append(float(masked.sum(1).mean()))
                duplicates.append(float((torch.cdist(gt, out["points"][0]) <= 2.0).sum(1).float().mean()))
            localization.update([points], [gt])
        else:
            density = model(batch["image"])["density"]
            count = float(density_count_in_region(density, batch["image_size"], 8)[0])
        counting.update(torch.tensor([count]), torch.tensor([float(len(gt))]))
        errors.append(count - len(gt))
    result = {k: float(v) for k, v in counting.compute().items() if k in ("mae", "rmse")}
    result["mean_signed_error"] = float(np.mean(errors))
    if args.method == "p2p":
        loc = {k: float(v) for k, v in localization.compute().items()}
        result.update(f1_4=loc["sigma_s_f1"], f1_8=loc["sigma_l_f1"], precision_8=loc["sigma_l_precision"],
                      recall_8=loc["sigma_l_recall"], max_score=float(np.mean(max_scores)),
                      soft_count_mae=float(np.mean([abs(c - len(s["points"])) for c, s in zip(soft_counts, samples)])),
                      gt_local_max=float(np.mean(local_max)), gt_local_sum=float(np.mean(local_sum)),
                      gt_predictions_within_2px=float(np.mean(duplicates)),
                      **{f"mae_at_{t}": float(np.mean(np.abs(e))) for t, e in sweep.items()})
        for r in MERGE_RADII:
            loc = {k: float(v) for k, v in merged_loc[r].compute().items()}
            result.update({f"merge{r:g}_mae": float(np.mean(np.abs(merged_errors[r]))),
                           f"merge{r:g}_f1_4": loc["sigma_s_f1"], f"merge{r:g}_f1_8": loc["sigma_l_f1"]})
    model.train()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("p2p", "density"), default="p2p")
    ap.add_argument("--dataset", default="shb")
    ap.add_argument("--root", default="/work/shared/data/shanghaitech/part_B")
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--val-count", type=int, default=40)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--fpn-channels", type=int, default=256)
    ap.add_argument("--head-channels", type=int, default=256)
    ap.add_argument("--anchors", type=int, default=2, help="anchor rows = cols per stride-8 cell")
    ap.add_argument("--cls-prior", type=float, default=None)
    ap.add_argument("--cls-loss", choices=("ce", "focal"), default="ce")
    ap.add_argument("--focal-gamma", type=float, default=2.0)
    ap.add_argument("--match-on", choices=("predicted", "anchors"), default="predicted")
    ap.add_argument("--eos-coef", type=float, default=0.5)
    ap.add_argument("--point-loss-coef", type=float, default=2e-4)
    ap.add_argument("--cost-point", type=float, default=0.05)
    ap.add_argument("--cost-class", type=float, default=1.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--density-channels", type=int, nargs="*", default=None)
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--scale-range", type=float, nargs=2, default=(0.7, 1.3))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone-lr", type=float, default=None, help="default: --lr")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--schedule", choices=("constant", "cosine", "step"), default="constant")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--ema", type=float, default=None, help="EMA decay (e.g. 0.995); None: no EMA")
    ap.add_argument("--ema-no-warmup", action="store_true", help="a fixed decay from the first step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--save", default=None, help="save the best (val MAE) weights here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0, c0 = time.time(), time.process_time()
    names, raws = load_cached(args.dataset, args.root, args.max_size)
    val_set = set(validation_names(names, args.val_count))
    train = [r for n, r in zip(names, raws) if n not in val_set]
    to_eval = EvalTransform(32)
    val = [to_eval(r) for n, r in zip(names, raws) if n in val_set]
    mean_count = float(np.mean([len(r["points"]) for r in train]))
    baseline = float(np.mean([abs(mean_count - len(s["points"])) for s in val]))
    out = open(args.out, "w") if args.out else None

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"kind": "config", **vars(args), "train_images": len(train), "val_images": len(val),
          "train_mean_count": mean_count, "val_mean_count_baseline_mae": baseline, "load_s": time.time() - t0})

    model, criterion = build(args)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    rest = [p for p in model.parameters() if id(p) not in backbone_ids]
    optimizer = torch.optim.Adam([{"params": rest, "lr": args.lr},
                                  {"params": list(model.backbone.parameters()), "lr": args.backbone_lr or args.lr}],
                                 weight_decay=args.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    ema = EMA(model, args.ema, warmup=not args.ema_no_warmup) if args.ema else None
    transform = TrainTransform(crop_size=args.crop, scale_range=tuple(args.scale_range), seed=args.seed)
    rng = np.random.default_rng(args.seed)
    order: list[int] = []
    sums: dict[str, float] = {}
    n_logged = 0
    best = {"mae": float("inf")}
    best_ema = {"mae": float("inf")}
    model.train()
    for step in range(args.steps):
        factor = lr_factor(step, args.steps, args.warmup, args.schedule)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * factor
        picks = []
        while len(picks) < args.batch:
            if not order:
                order = list(rng.permutation(len(train)))
            picks.append(order.pop())
        batch = collate_samples([transform(train[i]) for i in picks])
        if args.method == "p2p":
            outputs = model(batch["image"])
            losses = criterion(outputs, batch["points"])
            with torch.no_grad():
                prob = outputs["logits"].softmax(-1)[..., 1]
                stats = {"max_score": float(prob.max(1).values.mean()), "above": float((prob > args.threshold).sum(1).float().mean()),
                         "positive_fraction": sum(len(p) for p in batch["points"]) / prob.numel(),
                         "empty_crops": float(np.mean([len(p) == 0 for p in batch["points"]]))}
        else:
            density = model(batch["image"])["density"]
            losses = criterion(density, batch["points"], batch["image_size"])
            stats = {"count_error": float(losses["count_error"])}
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if args.grad_clip:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        optimizer.step()
        if ema:
            ema.update(model)
        for k, v in {**{k: float(v.detach()) for k, v in losses.items() if k in ("loss", "cls", "point")}, **stats}.items():
            sums[k] = sums.get(k, 0.0) + v
        n_logged += 1
        if (step + 1) % args.log_every == 0:
            emit({"kind": "train", "step": step + 1, "lr": optimizer.param_groups[0]["lr"],
                  **{k: v / n_logged for k, v in sums.items()}, "wall_s": time.time() - t0,
                  "cpu_s": time.process_time() - c0})
            sums, n_logged = {}, 0
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            record = {"kind": "val", "step": step + 1, "epoch": (step + 1) * args.batch / len(train),
                      **evaluate(model, val, args)}
            if ema:
                record.update({f"ema_{k}": v for k, v in evaluate(ema.model, val, args).items()})
            record.update(wall_s=time.time() - t0, cpu_s=time.process_time() - c0)
            emit(record)
            if record["mae"] < best["mae"]:
                best = {k: v for k, v in record.items() if not k.startswith("ema_")}
                if args.save and not ema:
                    torch.save(model.state_dict(), args.save)
            if ema and record["ema_mae"] < best_ema["mae"]:
                best_ema = {"step": record["step"], **{k[4:]: v for k, v in record.items() if k.startswith("ema_")}}
                if args.save:
                    torch.save(ema.model.state_dict(), args.save)
    if args.save:
        torch.save(model.state_dict(), args.save + ".last")
        if ema:
            torch.save(ema.model.state_dict(), args.save + ".ema_last")
    emit({"kind": "summary", "best": best, "best_ema": best_ema if ema else None,
          "val_mean_count_baseline_mae": baseline, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
