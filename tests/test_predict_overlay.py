"""`crowdseg predict` writes an overlay picture per image beside its JSON record."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY
from crowdseg.config import load_config
from crowdseg.data import build_datamodule
from crowdseg.predict import density_cells, prediction_overlay
from crowdseg.train import evaluate, train
from crowdseg.vis import PRED_COLOR, to_uint8_image

ROOT = Path(__file__).resolve().parents[1]
P2P = ROOT / "experiments" / "p2p" / "synthetic.yaml"
DENSITY = ROOT / "experiments" / "density" / "synthetic.yaml"


def red_pixels(picture: np.ndarray) -> int:
    return int((picture == np.array(PRED_COLOR, np.uint8)).all(-1).sum())


def test_overlay_draws_points_and_density_at_the_image_size():
    image = torch.full((3, 20, 30), 0.5)
    points = prediction_overlay(image, {"points": torch.tensor([[5.0, 5.0], [25.0, 15.0]])})
    assert points.shape == (20, 30, 3) and red_pixels(points) > 0
    density = torch.zeros(4, 5)          # a 32 x 40 padded batch image at stride 8
    density[0, 0] = 1.0
    assert density_cells(density, (20, 30), (32, 40)).shape == (3, 4)
    heat = prediction_overlay(image, {"count": 1.0, "density": density}, padded=(32, 40))
    assert heat.shape == (20, 30, 3) and not np.array_equal(heat, to_uint8_image(image))
    assert prediction_overlay(image, {"count": 3.0}) is None


@pytest.mark.parametrize("experiment, extra", [(P2P, ["loss.score_threshold=0.01"]), (DENSITY, ["density.channels=[16,16]"])],
                         ids=["p2p", "density"])
def test_predict_writes_an_overlay_per_image(experiment, extra, tmp_path):
    overrides = TINY + extra + [f"runs_root={tmp_path / 'runs'}", "data.synthetic.num_train=4"]  # 1 step, all test images
    if experiment == DENSITY:  # the density counter's `model` is only its backbone
        overrides = [o for o in overrides if not o.startswith(("model.fpn_channels", "model.head_channels"))]
    cfg = load_config(experiment, overrides)
    train(cfg)
    out = Path(evaluate(cfg, "predict")["predictions"])
    dataset = build_datamodule(cfg).dataset("test")
    assert len(dataset) == cfg.data.synthetic.num_test
    for sample in (dataset[i] for i in range(len(dataset))):
        stem = Path(sample["meta"]["name"]).stem
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["overlay"] == f"{stem}_overlay.png"
        picture = cv2.imread(str(out / record["overlay"]), cv2.IMREAD_COLOR)[..., ::-1]
        plain = to_uint8_image(sample["image"])
        assert picture.shape == plain.shape
        if experiment == P2P:
            assert (red_pixels(picture) > 0) == (record["count"] > 0)
        else:
            assert not np.array_equal(picture, plain)
