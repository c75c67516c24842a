"""Training samples per second of the data pipeline: reading the files vs. the preprocessing cache.

Both ways run the same pipeline: DataLoader (2 workers) -> sample (decode, resize so the long side is
at most --max-size, random scale 0.7-1.3 + 256 x 256 crop + flip) -> collate into batches of 8.
"files" decodes every JPEG in full each time; "cache" reads the preprocessed image as a memory map
and only touches the crop window. The cache is built once beforehand (its build time is reported).

Data: UCF-CC-50 (../shared/data/ucf_cc_50, 50 grayscale images). Those files are all at most
1 MP (1024 x 1024), so the benchmark also runs on a copy with every image upscaled to about
2.5 MP or more (at least 2x per side, bicubic, JPEG quality 90, points moved with the image): the ">2 MP"
case of QNRF / NWPU-sized images.

    .venv/bin/python benchmarks/data_pipeline.py [--epochs 2] [--repeats 3] [--workers 2] [--max-size 2048]

Each way is timed `--repeats` times, interleaved (files, cache, files, cache, ...), after a warm-up
epoch; the median samples/s is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crowdseg.io import write_json_atomic  # noqa: E402
from datamodules.dataset import build_dataset  # noqa: E402
from datamodules.transforms import TrainTransform  # noqa: E402
from datamodules.types import collate_samples  # noqa: E402

UCF = ROOT.parent / "shared" / "data" / "ucf_cc_50"


def upscaled_copy(src: Path, dst: Path, min_megapixels: float = 2.5) -> Path:
    """UCF-CC-50 with every image upscaled (bicubic, aspect kept, at least 2x per side) to at least
    `min_megapixels`, and its annPoints moved with it."""
    dst.mkdir(parents=True, exist_ok=True)
    for jpg in sorted(src.glob("*.jpg")):
        im = Image.open(jpg)
        f = max(2.0, (min_megapixels * 1e6 / (im.width * im.height)) ** 0.5)
        w, h = round(im.width * f), round(im.height * f)
        im.resize((w, h), Image.BICUBIC).save(dst / jpg.name, quality=90)
        pts = scipy.io.loadmat(src / f"{jpg.stem}_ann.mat")["annPoints"].astype(np.float64)
        # 1-based pixel centres: (p - 0.5) * scale + 0.5
        scale = np.array([w / im.width, h / im.height])
        scipy.io.savemat(dst / f"{jpg.stem}_ann.mat", {"annPoints": (pts - 0.5) * scale + 0.5})
    return dst


def megapixels(root: Path) -> list[float]:
    return [Image.open(p).width * Image.open(p).height / 1e6 for p in sorted(root.glob("*.jpg"))]


def make_loader(dataset, workers: int, batch_size: int) -> DataLoader:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_samples, persistent_workers=workers > 0, drop_last=False)
    for _ in loader:  # warm-up epoch: worker start-up, page cache
        pass
    return loader


def samples_per_second(loader: DataLoader, epochs: int) -> float:
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def run(root: Path, label: str, args, cache_root: Path) -> list[dict]:
    common = dict(on_bad_annotation="drop", max_size=args.max_size, progress=False)
    transform = TrainTransform(crop_size=256, scale_range=(0.7, 1.3), hflip=0.5)
    files = build_dataset("ucf_cc_50", str(root), "all", transform=transform, **common)
    t0 = time.perf_counter()
    cached = build_dataset("ucf_cc_50", str(root), "all", transform=transform, cache_dir=str(cache_root),
                           num_workers=args.workers, **common)
    build_s = time.perf_counter() - t0
    mp = megapixels(root)
    torch.manual_seed(0)
    loaders = {"files": make_loader(files, args.workers, args.batch_size),
               "cache": make_loader(cached, args.workers, args.batch_size)}
    trials: dict[str, list[float]] = {"files": [], "cache": []}
    for _ in range(args.repeats):  # interleaved, so both ways see the same machine load
        for way, loader in loaders.items():
            trials[way].append(samples_per_second(loader, args.epochs))
    rows = []
    for way in ("files", "cache"):
        rows.append({"data": label, "way": way, "images": len(files), "mean_mp": float(np.mean(mp)),
                     "max_mp": float(np.max(mp)), "images_over_2mp": int(sum(m > 2 for m in mp)),
                     "samples_per_s": float(np.median(trials[way])), "trials": trials[way],
                     "cache_build_s": build_s if way == "cache" else None})
    rows[1]["speedup"] = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    del loaders
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed trial")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials per way (the median is reported)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-size", type=int, default=2048)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = upscaled_copy(UCF, tmp / "ucf_cc_50_x2")
        rows = run(UCF, "UCF-CC-50 (original, <= 1 MP)", args, tmp / "cache")
        rows += run(big, "UCF-CC-50 upscaled (all > 2 MP)", args, tmp / "cache")
    print(f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 CPU cores)")
    print(f"{'data':38s} {'way':6s} {'imgs':>4s} {'mean MP':>8s} {'>2MP':>5s} {'samples/s':>10s} {'speedup':>8s}")
    for r in rows:
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        print(f"{r['data']:38s} {r['way']:6s} {r['images']:4d} {r['mean_mp']:8.2f} {r['images_over_2mp']:5d} "
              f"{r['samples_per_s']:10.1f} {speed:>8s}")
    result = {"command": "python benchmarks/data_pipeline.py " + " ".join(argv or sys.argv[1:]),
              "settings": {"workers": args.workers, "batch_size": args.batch_size, "epochs": args.epochs,
                           "max_size": args.max_size, "crop": 256, "scale_range": [0.7, 1.3]},
              "machine": {"cpu_count": os.cpu_count(), "load_average_1min": [load_before, os.getloadavg()[0]],
                          "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "rows": rows}
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
