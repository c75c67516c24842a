"""`method: density` end to end on a tiny synthetic crowd: fit, metrics JSON, pictures, mask terms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crowdseg.config import load_config
from crowdseg.errors import ConfigError
from crowdseg.train import build_job, evaluate, train
from datamodules.types import collate_samples

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "density" / "synthetic.yaml"
MASK = ROOT / "experiments" / "density" / "synthetic_mask_loss.yaml"
SMALL = ["density.channels=[16,16]"]
COUNTING_KEYS = {"mae", "rmse", "mse", "nae"}


@pytest.mark.parametrize("experiment", [BASE, MASK], ids=["plain", "mask_loss"])
def test_fast_dev_run_writes_metrics_and_pictures(experiment, tiny_overrides):
    cfg = load_config(experiment, tiny_overrides + SMALL + ["trainer.fast_dev_run=true"])
    result = train(cfg)
    assert result["global_step"] == 1 and torch.isfinite(torch.tensor(result["train/loss"]))
    assert ("train/mask_unit_mass" in result) == cfg.mask_loss.enabled
    run = Path(result["run_dir"])
    val = json.loads((run / "metrics" / "val.json").read_text())["metrics"]
    assert set(val) == {f"val/{k}" for k in COUNTING_KEYS | {"mae_mean_baseline"}}
    assert val["val/mae"] == pytest.approx(result["val/mae"]) and val["val/mae"] >= 0
    assert (run / "pictures" / "val_00.png").is_file()
    if cfg.mask_loss.enabled:   # once is enough: test reuses the run's checkpoint
        metrics = evaluate(cfg, "test")
        test = json.loads((run / "metrics" / "test.json").read_text())["metrics"]
        assert set(test) == {f"test/{k}" for k in COUNTING_KEYS}
        assert test["test/mae"] == pytest.approx(metrics["test/mae"])


def _job_and_batch(tiny_overrides, overrides=()):
    cfg = load_config(MASK, tiny_overrides + SMALL + list(overrides))
    job = build_job(cfg, Path(cfg.runs_root))
    train_set = job.datamodule.datasets["train"]
    return job, collate_samples([train_set[i] for i in range(2)])


def test_mask_terms_change_the_loss_and_its_gradient(tiny_overrides):
    torch.manual_seed(0)
    job, batch = _job_and_batch(tiny_overrides)
    module = job.module
    assert module.mask_loss is not None and module.one_point_loss is not None

    def loss_and_grad():
        module.zero_grad()
        losses = module.compute_losses(batch)
        losses["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in module.model.head.parameters()])
        return losses, grad

    with_mask, grad_with = loss_and_grad()
    mask_loss, one_point_loss = module.mask_loss, module.one_point_loss
    module.mask_loss = module.one_point_loss = None
    without, grad_without = loss_and_grad()
    assert with_mask["density"].item() == pytest.approx(without["loss"].item(), rel=1e-6)  # same batch, same weights
    assert with_mask["loss"].item() == pytest.approx(without["loss"].item() + with_mask["mask_loss"].item(), rel=1e-5)
    assert with_mask["mask_loss"].item() > 0 and with_mask["mask_skipped"].item() == 0.0
    assert not torch.allclose(grad_with, grad_without)

    # a batch in which some image has no instance map skips the mask terms
    module.mask_loss, module.one_point_loss = mask_loss, one_point_loss
    skipped = module.compute_losses({**batch, "instance_map": None})
    assert skipped["mask_skipped"].item() == 1.0
    assert skipped["loss"].item() == pytest.approx(without["loss"].item(), rel=1e-6)


def test_bad_density_values_are_config_errors(tiny_overrides):
    with pytest.raises(ConfigError, match="density.activation"):
        _job_and_batch(tiny_overrides, ["density.activation=tanh"])
    with pytest.raises(ConfigError, match="mask_loss.temperature"):
        _job_and_batch(tiny_overrides, ["mask_loss.temperature=0"])
