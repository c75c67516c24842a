"""The point predictor with the mask-supervised counting loss, and its evaluation outputs."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from crowdseg.config import load_config
from crowdseg.errors import ConfigError
from crowdseg.mask_supervision import mask_coverage, point_mask_loss
from crowdseg.train import build_job, train
from datamodules.types import collate_samples

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "p2p" / "synthetic.yaml"
MASK = ROOT / "experiments" / "p2p" / "synthetic_mask_loss.yaml"
LOCALIZATION_KEYS = {f"sigma_{s}_{k}" for s in "sl" for k in ("precision", "recall", "f1", "tp", "fp", "fn")}
COUNTING_KEYS = {"mae", "rmse", "mse", "nae"}


@pytest.mark.parametrize("experiment", [BASE, MASK], ids=["plain", "mask_loss"])
def test_fast_dev_run_logs_counting_and_localization(experiment, tiny_overrides):
    cfg = load_config(experiment, tiny_overrides + ["trainer.fast_dev_run=true"])
    result = train(cfg)
    assert result["global_step"] == 1 and torch.isfinite(torch.tensor(result["train/loss"]))
    mask_keys = {"train/mask_loss", "train/mask_background", "train/mask_unit_mass", "train/mask_skipped"}
    assert mask_keys <= set(result) if cfg.mask_loss.enabled else not mask_keys & set(result)
    val = json.loads((Path(result["run_dir"]) / "metrics" / "val.json").read_text())["metrics"]
    orig_keys = {f"orig_{k}" for k in LOCALIZATION_KEYS}
    assert set(val) == {f"val/{k}" for k in COUNTING_KEYS | LOCALIZATION_KEYS | orig_keys | {"mae_mean_baseline"}}
    # the synthetic images are loaded at their own size: original pixels are loaded pixels
    assert all(val[f"val/orig_{k}"] == val[f"val/{k}"] for k in LOCALIZATION_KEYS)
    # tp + fn is the number of GT points at both radii; precision and recall are fractions
    assert val["val/sigma_s_tp"] + val["val/sigma_s_fn"] == val["val/sigma_l_tp"] + val["val/sigma_l_fn"] > 0
    assert val["val/sigma_s_tp"] <= val["val/sigma_l_tp"]          # the 8 px radius matches at least as many
    assert 0 <= val["val/sigma_l_precision"] <= 1 and val["val/mae"] == pytest.approx(result["val/mae"])


def _job_and_batch(tiny_overrides, overrides=()):
    cfg = load_config(MASK, tiny_overrides + list(overrides))
    job = build_job(cfg, Path(cfg.runs_root))
    train_set = job.datamodule.datasets["train"]
    return job, collate_samples([train_set[i] for i in range(2)])


@pytest.mark.parametrize("points", ["predicted", "anchors"])
def test_mask_loss_changes_the_loss_and_its_gradient(points, tiny_overrides):
    torch.manual_seed(0)
    job, batch = _job_and_batch(tiny_overrides, [f"mask_loss.points={points}"])
    module = job.module
    assert module.mask_loss is not None and module.mask_points == points

    def loss_and_grad():
        module.zero_grad()
        losses = module.compute_losses(batch)
        losses["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in module.model.classification.parameters()])
        return losses, grad

    with_mask, grad_with = loss_and_grad()
    mask_loss = module.mask_loss
    module.mask_loss = None
    without, grad_without = loss_and_grad()
    base = without["loss"].item()
    assert with_mask["cls"].item() == pytest.approx(without["cls"].item(), rel=1e-6)
    assert with_mask["loss"].item() == pytest.approx(base + with_mask["mask_loss"].item(), rel=1e-5)
    # untrained scores are about 0.5 everywhere, so the mean score of the background points is too
    assert with_mask["mask_background"].item() == pytest.approx(0.5, abs=0.1)
    assert with_mask["mask_unit_mass"].item() > 0.0
    assert not torch.allclose(grad_with, grad_without)

    module.mask_loss = mask_loss   # a batch in which some image has no instance map skips the term
    skipped = module.compute_losses({**batch, "instance_map": None})
    assert skipped["mask_skipped"].item() == 1.0 and skipped["loss"].item() == pytest.approx(base, rel=1e-6)


def test_enabled_without_masks_is_a_config_error(tiny_overrides):
    cfg = load_config(MASK, tiny_overrides)
    no_masks = [{"image": torch.zeros(3, 8, 8), "points": torch.zeros(0, 2), "instance_map": None}]
    with pytest.raises(ConfigError, match="mask_loss.enabled.*no instance masks"):
        point_mask_loss(cfg, SimpleNamespace(datasets={"train": no_masks}))
    disabled = load_config(BASE, tiny_overrides)
    assert point_mask_loss(disabled, SimpleNamespace(datasets={"train": no_masks})) is None
    with pytest.raises(ConfigError, match="mask_loss.points"):
        point_mask_loss(load_config(MASK, tiny_overrides + ["mask_loss.points=centres"]), None)


def test_mask_coverage_of_records_and_wrappers():
    def record(name, mask=None, polygons=None):
        return SimpleNamespace(name=name, mask_path=mask, polygons=polygons)

    assert mask_coverage(SimpleNamespace(records=[record("a.jpg", "a.png"), record("b.jpg", polygons=[])])) == ("all", None)
    assert mask_coverage(SimpleNamespace(records=[record("a.jpg", "a.png"), record("b.jpg")])) == ("some", "b.jpg")
    assert mask_coverage(SimpleNamespace(records=[record("a.jpg")])) == ("none", "a.jpg")
    concat = SimpleNamespace(datasets=[SimpleNamespace(records=[record("a.jpg", "a.png")]),
                                       SimpleNamespace(records=[record("b.jpg")])])
    assert mask_coverage(concat) == ("some", "b.jpg")
    samples = [{"instance_map": torch.zeros(4, 4, dtype=torch.long)}]
    assert mask_coverage(samples) == ("all", None)
    assert mask_coverage([{"instance_map": None, "meta": {"name": "c.jpg"}}]) == ("none", "c.jpg")


def test_f1_in_original_pixels_scales_the_matching_radius():
    from crowdseg.lit.p2p import LOCALIZATION_RADII, in_original_pixels
    from crowdseg.metrics.torch_metrics import LocalizationMetrics

    gt = [torch.tensor([[10.0, 10.0], [40.0, 40.0]])]
    pred = [torch.tensor([[16.0, 10.0], [41.0, 40.0]])]       # 6 px and 1 px away on the loaded image

    def scores(scale: float) -> dict[str, float]:
        loaded = LocalizationMetrics(fixed_radii=LOCALIZATION_RADII)
        original = LocalizationMetrics(fixed_radii=LOCALIZATION_RADII, prefix="orig_")
        loaded.update(pred, gt)
        original.update(in_original_pixels(pred, [scale]), in_original_pixels(gt, [scale]))
        return {k: float(v) for k, v in {**loaded.compute(), **original.compute()}.items()}

    same = scores(1.0)
    assert all(same[f"orig_{k}"] == same[k] for k in LOCALIZATION_KEYS)
    assert same["sigma_l_tp"] == 2 and same["sigma_s_tp"] == 1
    half = scores(0.5)              # loaded at half size: 6 loaded px are 12 original px, outside 8 px
    assert half["orig_sigma_l_tp"] == 1 and half["orig_sigma_l_f1"] == pytest.approx(0.5)
    assert half["sigma_l_tp"] == 2   # the loaded-image score is unchanged
