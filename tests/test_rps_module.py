"""RPSModule end to end: a GRPO step, resume of policy / reference / counters, DDP, fit + test."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from crowdseg.config import load_config
from crowdseg.lit.rps import RPSModule
from crowdseg.runs import prepare_run_dir
from crowdseg.train import build_job, build_trainer, evaluate, train
from datamodules.readers.idmaps import read_id_map

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "rps" / "synthetic.yaml"
CONTROL = ROOT / "experiments" / "rps" / "synthetic_no_grpo.yaml"

# On top of conftest's TINY: a tiny scorer and few candidates on small, sparse images.
RPS_TINY = ["rps.num_candidates=4", "rps.group_size=4", "rps.scorer_channels=16", "sam.prompt_chunk=64",
            "data.synthetic.height=64", "data.synthetic.width=64", "data.synthetic.max_people=8",
            "trainer.check_val_every_n_epoch=1", "checkpoint_every_n_steps=1", "rps.proposer_steps=0"]


@pytest.fixture
def rps_overrides(tiny_overrides):
    return tiny_overrides + RPS_TINY


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fast_dev_run_makes_one_grpo_update_of_the_scorer_only(rps_overrides):
    cfg = load_config(EXPERIMENT, rps_overrides + ["rps.train_proposer=false", "rps.ppo_epochs=1",
                                                   "trainer.fast_dev_run=true"])
    path = prepare_run_dir(cfg)
    job = build_job(cfg, path)
    module: RPSModule = job.module
    scorer, reference, proposer = _state(module.scorer), _state(module.reference), _state(module.proposer)
    build_trainer(cfg, path, job).fit(module, datamodule=job.datamodule)
    assert module.counters == {"batches": 1, "rollouts": 1, "policy_updates": 1, "warmup_updates": 0}
    assert not _same(_state(module.scorer), scorer), "the GRPO step did not move the scorer"
    assert _same(_state(module.reference), reference) and _same(_state(module.proposer), proposer)
    logged = module.trainer.callback_metrics
    for key in ("reward_mean", "reward_std", "clip_fraction", "kl", "reward_selected", "reward_original"):
        assert 0.0 <= float(logged[f"train/{key}"]) <= 1.0, key
    # one update per rollout: pi_old == pi_theta, so the ratio is exactly 1 and nothing is clipped
    assert float(logged["train/ratio"]) == 1.0 and float(logged["train/clip_fraction"]) == 0.0
    assert float(logged["train/policy_updates"]) == 1.0


def test_bf16_mixed_grpo_step(rps_overrides):
    """`trainer.precision=bf16-mixed`, the usual GPU setting, runs the whole GRPO step (CPU autocast here)."""
    cfg = load_config(EXPERIMENT, rps_overrides + ["rps.train_proposer=false", "rps.ppo_epochs=1", "trainer.fast_dev_run=true",
                                                   "trainer.precision=bf16-mixed"])
    path = prepare_run_dir(cfg)
    job = build_job(cfg, path)
    scorer = _state(job.module.scorer)
    build_trainer(cfg, path, job).fit(job.module, datamodule=job.datamodule)
    assert job.module.counters["policy_updates"] == 1 and not _same(_state(job.module.scorer), scorer)
    assert torch.isfinite(job.module.trainer.callback_metrics["train/reward_mean"])


class _Probe(L.Callback):
    """Records the module's policy, reference and counters when training starts (after any restore)."""

    def on_train_start(self, trainer, module):
        self.start = (_state(module.scorer), _state(module.reference), dict(module.counters))


def _fit(cfg, probe: _Probe) -> RPSModule:
    path = prepare_run_dir(cfg)
    job = build_job(cfg, path)
    trainer = build_trainer(cfg, path, job)
    trainer.callbacks.append(probe)
    ckpt = path / "checkpoints" / "last.ckpt"
    trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=str(ckpt) if ckpt.is_file() else None)
    return job.module


@pytest.mark.slow
def test_resume_restores_policy_reference_and_counters(rps_overrides):
    # 1 warm-up rollout, then GRPO with 2 updates per rollout; stop after 3 optimizer steps, then go on to 7
    base = rps_overrides + ["rps.train_proposer=false", "rps.warmup_steps=1", "rps.ppo_epochs=2",
                            "trainer.max_epochs=10", "trainer.limit_val_batches=0"]
    first = _fit(load_config(EXPERIMENT, base + ["trainer.max_steps=3"]), _Probe())
    assert first.counters == {"batches": 2, "rollouts": 2, "policy_updates": 2, "warmup_updates": 1}
    ckpt = torch.load(Path(first.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["rps_counters"] == first.counters and ckpt["global_step"] == 3
    saved_scorer = {k[len("scorer."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("scorer.")}
    saved_reference = {k[len("reference."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("reference.")}
    assert _same(saved_scorer, _state(first.scorer)) and _same(saved_reference, _state(first.reference))
    # the reference is the warmed-up scorer, not the (zero-output) initial one
    assert saved_reference["output.weight"].abs().sum() > 0

    probe = _Probe()
    second = _fit(load_config(EXPERIMENT, base + ["trainer.max_steps=7"]), probe)
    scorer, reference, counters = probe.start
    assert counters == first.counters
    assert _same(scorer, saved_scorer) and _same(reference, saved_reference)
    assert second.counters == {"batches": 4, "rollouts": 4, "policy_updates": 6, "warmup_updates": 1}
    assert _same(_state(second.reference), saved_reference), "the reference moved during GRPO"
    assert not _same(_state(second.scorer), saved_scorer)


class _SaveRankState(L.Callback):
    """Each rank writes its scorer weights and the names of the images it trained on."""

    def __init__(self, out_dir: str):
        self.out_dir, self.names = out_dir, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.names += [m["name"] for m in batch["meta"]]

    def on_train_end(self, trainer, module):
        # parameters only: DDP syncs gradients; batch-norm running statistics stay per rank until the
        # next forward broadcasts rank 0's
        proposer = {k: v.detach().clone() for k, v in module.proposer.named_parameters()}
        torch.save({"scorer": _state(module.scorer), "proposer": proposer, "names": self.names,
                    "counters": dict(module.counters)},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_two_process_ddp_grpo_ends_with_identical_policies(rps_overrides, tmp_path):
    cfg = load_config(EXPERIMENT, rps_overrides + [
        "rps.train_proposer=true", "rps.proposer_steps=1", "rps.ppo_epochs=2", "trainer.devices=2",
        "trainer.strategy=ddp_spawn", "trainer.limit_val_batches=0", "data.synthetic.num_train=8", "data.batch_size=4"])
    path = prepare_run_dir(cfg)
    job = build_job(cfg, path)
    initial = _state(job.module.scorer)
    initial_proposer = {k: v.detach().clone() for k, v in job.module.proposer.named_parameters()}
    trainer = build_trainer(cfg, path, job)
    trainer.callbacks.append(_SaveRankState(str(tmp_path)))
    trainer.fit(job.module, datamodule=job.datamodule)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # the ranks saw different images, so identical weights mean the gradients were synchronised
    assert ranks[0]["names"] and not set(ranks[0]["names"]) & set(ranks[1]["names"])
    # 2 batches per rank: the proposer alone, then one rollout with 2 GRPO updates (+ the proposer's)
    assert ranks[0]["counters"] == ranks[1]["counters"] == {"batches": 2, "rollouts": 1, "policy_updates": 2,
                                                            "warmup_updates": 0}
    for part, start in (("scorer", initial), ("proposer", initial_proposer)):
        assert _same(ranks[0][part], ranks[1][part]), part
        assert not _same(ranks[0][part], start), part


@pytest.mark.slow
def test_fit_then_test_reports_selected_and_original_metrics(rps_overrides):
    cfg = load_config(EXPERIMENT, rps_overrides + ["trainer.max_epochs=1"])
    result = train(cfg)
    # 8 images in batches of 4: 2 rollouts of ppo_epochs updates each
    assert result["train/policy_updates"] == 2 * cfg.rps.ppo_epochs and 0 <= result["val/iou_c"] <= 1
    metrics = evaluate(cfg, "test")
    written = json.loads((Path(result["run_dir"]) / "metrics" / "test.json").read_text())["metrics"]
    for key in ("mae", "rmse", "sigma_l_f1", "iou_c", "mask_ap", "point_iou"):
        for suffix in ("", "_original"):
            if key in ("mae", "rmse") and suffix:
                continue
            name = f"test/{key}{suffix}"
            assert name in written and written[name] == pytest.approx(metrics[name]), name
    assert 0 <= written["test/iou_c"] <= 1 and written["test/gt_instances"] > 0
    assert written["test/shift"] >= abs(written["test/shift_y"])
    predicted = evaluate(cfg, "predict")
    out = Path(predicted["predictions"])
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"]
    assert predicted["images"] == len(records) == cfg.data.synthetic.num_test
    for record in records:
        id_map = read_id_map(out / record["instance_map"])
        assert id_map.shape == (64, 64) and id_map.max() <= record["count"] == len(record["points"])
        assert len(record["points"]) == len(record["proposer_points"])


@pytest.mark.slow
def test_control_without_grpo_uses_the_proposer_points(rps_overrides):
    cfg = load_config(CONTROL, rps_overrides + ["trainer.max_epochs=1", "data.synthetic.num_train=4"])
    result = train(cfg)
    assert result["train/policy_updates"] == 0 and result["train/rollouts"] == 1
    assert result["val/iou_c"] == result["val/iou_c_original"]
    assert result["val/sigma_l_f1"] == result["val/sigma_l_f1_original"]
    assert result["val/shift"] == 0.0


def test_config_errors_and_proposer_checkpoint(rps_overrides, tmp_path):
    from crowdseg.errors import ConfigError

    def module(*overrides):
        return build_job(load_config(EXPERIMENT, rps_overrides + list(overrides)), tmp_path).module

    with pytest.raises(ConfigError, match="rps.train_points"):
        load_config(EXPERIMENT, rps_overrides + ["rps.train_points=gt"])   # checked at load time
    with pytest.raises(ConfigError, match="rps.proposer_ckpt.*not found"):
        module(f"rps.proposer_ckpt={tmp_path / 'x.ckpt'}")
    # a p2p run's checkpoint holds the predictor under `model.`; its weights become the proposer's
    donor = module("model.anchor_rows=2")
    with torch.no_grad():
        for p in donor.proposer.parameters():
            p.add_(1.0)
    ckpt = tmp_path / "p2p.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in donor.proposer.state_dict().items()}}, ckpt)
    assert _same(_state(module(f"rps.proposer_ckpt={ckpt}").proposer), _state(donor.proposer))
    with pytest.raises(ConfigError, match="does not fit"):
        module(f"rps.proposer_ckpt={ckpt}", "model.fpn_channels=16")
