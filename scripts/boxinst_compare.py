"""BoxInst checkpoints side by side on the same test images: image | GT | filled boxes | each checkpoint's masks.

  python scripts/boxinst_compare.py --out docs/figures/boxinst_synthetic.png --images 3 \
      "BoxInst=runs/bench/boxinst/synthetic/synthetic_seed0/checkpoints/best.ckpt" \
      "+ OverlapLoss=runs/bench/boxinst/synthetic/synthetic_overlap_seed0/checkpoints/best.ckpt"

Every panel shows the masks with score >= `boxinst.inference.overlap_score_threshold` as an
instance map in solid colours over the dimmed image (the higher score wins where masks overlap); "filled boxes" is the
box baseline of the first checkpoint's detections. The config comes from the first checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def load(ckpt: Path):
    """The BoxInst module of a checkpoint (built from the config stored in it) and its datamodule, in eval mode."""
    from crowdseg.methods.boxinst import build
    from crowdseg.runs import config_from_checkpoint

    job = build(config_from_checkpoint(ckpt, ["boxinst.init_ckpt=null"]), None)
    job.module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    return job.module.eval(), job.datamodule


def on_grey(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Instances in solid colours over a dimmed grey copy of the image (colourful crowds hide a blend)."""
    from crowdseg.vis import colorize_instances

    grey = np.repeat((image.mean(axis=2, keepdims=True) * 0.35).astype(np.uint8), 3, axis=2)
    return np.where((ids > 0)[..., None], colorize_instances(ids), grey)


def main() -> None:
    from crowdseg.lit.boxinst import filled_boxes, instance_map
    from crowdseg.vis import enlarge, save_png, to_uint8_image, with_caption
    from datamodules.types import collate_samples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="label=checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=3, help="test images (rows)")
    args = ap.parse_args()
    columns = [item.split("=", 1) for item in args.checkpoints]
    modules = [(label, load(Path(path))) for label, path in columns]
    _, datamodule = modules[0][1]
    datamodule.setup("test")
    dataset = datamodule.dataset("test")
    threshold = modules[0][1][0].settings.overlap_score_threshold
    rows = []
    for index in range(min(args.images, len(dataset))):
        batch = collate_samples([dataset[index]])
        h, w = batch["image_size"][0].tolist()
        image = to_uint8_image(batch["image"][0, :, :h, :w])
        gt = batch["instance_map"][0][:h, :w].numpy()
        panels = [("image", image), (f"GT ({len(np.unique(gt)) - 1})", on_grey(image, gt))]
        for number, (label, (module, _)) in enumerate(modules):
            with torch.no_grad():
                p = module.predict_instances(batch)[0]
            kept = int((p["scores"] >= threshold).sum())
            if number == 0:
                boxes = instance_map(filled_boxes(p["boxes"], (h, w)), p["scores"], threshold).numpy()
                panels.append((f"filled boxes ({kept})", on_grey(image, boxes)))
            ids = instance_map(p["masks"], p["scores"], threshold).numpy()
            panels.append((f"{label} ({kept})", on_grey(image, ids)))
        rows.append(np.concatenate([with_caption(enlarge(panel, 3 * max(h, w))[0], text) for text, panel in panels], 1))
    print(save_png(args.out, np.concatenate(rows, 0)))


if __name__ == "__main__":
    main()
