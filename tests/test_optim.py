"""The one builder of optimizers and schedules (crowdseg/optim.py), per method: each method's module,
built from a tiny config of its synthetic experiment, trains every parameter group at the learning
rates of the formulas it used before the builder (written out here, and compared exactly):

- p2p, density, rps: Adam, StepLR(step_size, gamma) stepped per epoch (lr x gamma x gamma ...);
  p2p and density also a cosine: lr x (t + 1) / (w + 1) while t < w, then lr x 0.5 (1 + cos(pi p));
- boxinst: lr x gamma ** #(milestones <= t) x (warmup_factor (1 - t / w) + t / w) while t < w;
- xmask: phase rate x gamma ** (epoch // step_size), 0 for the groups a phase freezes.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from crowdseg.config import load_config
from crowdseg.config.schema import OptimConfig
from crowdseg.methods import METHODS
from crowdseg.optim import build_optimizer, make_optimizer, schedule_factor, warmup_multistep

from conftest import ROOT, TINY

BOXINST_TINY = ["boxinst.model.backbone=resnet10t", "boxinst.model.fpn_channels=32", "boxinst.model.head_convs=1",
                "boxinst.model.mask_branch_channels=16", "boxinst.model.mask_branch_convs=1",
                "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.num_test=2",
                "data.synthetic.height=64", "data.synthetic.width=64", "data.num_workers=0"]
XMASK_TINY = ["model.backbone=resnet10t", "model.fuse_channels=16", "model.decoder_channels=16",
              "model.mask_channels=16", "model.emb_dim=8", "data.synthetic.num_train=20", "data.synthetic.num_val=2",
              "data.synthetic.num_test=2", "data.synthetic.height=64", "data.synthetic.width=64",
              "data.label_fraction=50", "data.num_workers=0"]
DENSITY_TINY = [o for o in TINY if not o.startswith(("model.fpn_channels", "model.head_channels"))]
RPS_TINY = TINY + ["rps.scorer_channels=16", "rps.num_candidates=4", "rps.group_size=4"]


def _module(method: str, tiny: list[str], overrides: list[str]):
    cfg = load_config(ROOT / "experiments" / method / "synthetic.yaml", tiny + overrides)
    return METHODS[method].build(cfg, None).module


def _rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def _rates_per_step(config: dict, epochs: int, steps_per_epoch: int) -> list[dict[str, float]]:
    """The rates of every optimizer step of `epochs` epochs, the scheduler stepped as Lightning steps it
    (after each optimizer step for interval "step", after each epoch for "epoch"); index = global step."""
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    interval = config["lr_scheduler"]["interval"]
    seen = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            seen.append(_rates(optimizer))
            optimizer.step()  # no gradients: changes nothing but the scheduler's bookkeeping
            if interval == "step":
                scheduler.step()
        if interval == "epoch":
            scheduler.step()
    return seen


# --------------------------------------------------------------------------------- p2p, density

@pytest.mark.parametrize("method, tiny", [("p2p", TINY), ("density", DENSITY_TINY)])
def test_step_schedule_is_steplr_per_epoch(method, tiny):
    module = _module(method, tiny, ["optim.lr=0.001", "optim.backbone_lr=0.0002", "optim.step_size=2",
                                    "optim.gamma=0.5", "optim.schedule=step"])
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(config["optimizer"], torch.optim.Adam) and config["optimizer"].defaults["weight_decay"] == 1e-4
    rates = _rates_per_step(config, epochs=5, steps_per_epoch=3)    # epoch = step // 3
    assert rates[0] == {"heads": 0.001, "backbone": 0.0002}
    assert rates[5] == rates[0]                                     # epoch 1: not yet
    assert rates[6] == {"heads": 0.001 * 0.5, "backbone": 0.0002 * 0.5}            # epoch 2: one StepLR step
    assert rates[12] == {"heads": 0.001 * 0.5 * 0.5, "backbone": 0.0002 * 0.5 * 0.5}  # epoch 4: two


@pytest.mark.parametrize("method, tiny", [("p2p", TINY), ("density", DENSITY_TINY)])
def test_cosine_schedule_warms_up_then_decays_to_zero_at_max_steps(method, tiny):
    module = _module(method, tiny, ["optim.lr=0.001", "optim.backbone_lr=0.0002", "optim.schedule=cosine",
                                    "optim.warmup_steps=3", "trainer.max_steps=11"])
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    rates = _rates_per_step(config, epochs=2, steps_per_epoch=7)
    for lr, group in ((0.001, "heads"), (0.0002, "backbone")):
        assert rates[0][group] == lr * (1 / 4) and rates[2][group] == lr * (3 / 4)   # warm-up: (t + 1) / (w + 1)
        assert rates[3][group] == lr * (0.5 * (1.0 + math.cos(math.pi * 0.0)))      # warmed up: lr
        assert rates[7][group] == lr * (0.5 * (1.0 + math.cos(math.pi * 0.5)))      # mid-cosine: about lr / 2
        assert rates[11][group] == lr * 0.0 and rates[13][group] == 0.0             # max_steps and after


# ------------------------------------------------------------------------------------------ rps

def test_rps_scorer_and_proposer_rates_with_steplr_per_epoch():
    module = _module("rps", RPS_TINY, ["rps.lr=0.003", "optim.lr=0.001", "optim.backbone_lr=0.0002",
                                       "optim.step_size=2", "optim.gamma=0.5", "rps.train_proposer=true"])
    scorer, proposer = module.configure_optimizers()
    assert scorer["lr_scheduler"]["interval"] == proposer["lr_scheduler"]["interval"] == "epoch"
    assert [g["name"] for g in proposer["optimizer"].param_groups] == ["heads", "backbone"]
    assert sum(len(g["params"]) for g in proposer["optimizer"].param_groups) == len(list(module.proposer.parameters()))
    scorer_rates = _rates_per_step(scorer, epochs=5, steps_per_epoch=2)
    proposer_rates = _rates_per_step(proposer, epochs=5, steps_per_epoch=2)
    assert [r["scorer"] for r in scorer_rates[::2]] == [0.003, 0.003, 0.003 * 0.5, 0.003 * 0.5, 0.003 * 0.5 * 0.5]
    assert proposer_rates[0] == {"heads": 0.001, "backbone": 0.0002}
    assert proposer_rates[8] == {"heads": 0.001 * 0.5 * 0.5, "backbone": 0.0002 * 0.5 * 0.5}


def test_rps_cosine_follows_the_global_step_of_both_optimizers():
    """Manual optimisation: before an update, the optimizer's cosine is brought to trainer.global_step
    (the steps of every optimizer), so a scorer that waited while the proposer trained alone starts
    at the run's position, and the cosine ends at trainer.max_steps."""
    module = _module("rps", RPS_TINY, ["rps.lr=0.003", "optim.lr=0.001", "optim.schedule=cosine",
                                       "optim.warmup_steps=2", "trainer.max_steps=10", "rps.train_proposer=true"])
    configs = module.configure_optimizers()
    lightning_configs = [SimpleNamespace(scheduler=c["lr_scheduler"]["scheduler"], interval=c["lr_scheduler"]["interval"])
                         for c in configs]
    scorer_opt, proposer_opt = (c["optimizer"] for c in configs)
    module._trainer = SimpleNamespace(lr_scheduler_configs=lightning_configs, global_step=0)
    module._schedule_to_global_step(proposer_opt)                   # the proposer alone, steps 0..2
    assert _rates(proposer_opt)["heads"] == 0.001 * (1 / 3)
    module._trainer.global_step = 3                                 # the scorer's first update
    module._schedule_to_global_step(scorer_opt)
    assert _rates(scorer_opt) == {"scorer": 0.003 * (0.5 * (1.0 + math.cos(math.pi * (1 / 8))))}
    module._trainer.global_step = 10
    for optimizer in (scorer_opt, proposer_opt):
        module._schedule_to_global_step(optimizer)
        assert all(rate == 0.0 for rate in _rates(optimizer).values())


# -------------------------------------------------------------------------------------- boxinst

def test_boxinst_step_schedule_is_detectron2_warmup_and_milestones():
    module = _module("boxinst", BOXINST_TINY, ["optim.lr=0.01", "optim.backbone_lr=0.002", "optim.gamma=0.5",
                                               "optim.step_size=1", "boxinst.solver.optimizer=sgd",
                                               "boxinst.solver.warmup_steps=4", "boxinst.solver.warmup_factor=0.1",
                                               "boxinst.solver.milestones=[8,6]"])
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"                # optim.step_size is not used
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    rates = _rates_per_step(config, epochs=1, steps_per_epoch=10)
    for lr, group in ((0.01, "heads"), (0.002, "backbone")):
        assert rates[0][group] == lr * (0.1 * (1 - 0 / 4) + 0 / 4)     # warm-up from warmup_factor x lr
        assert rates[2][group] == lr * (0.1 * (1 - 2 / 4) + 2 / 4)
        assert rates[4][group] == lr * 1.0 and rates[5][group] == lr   # warmed up
        assert rates[6][group] == lr * 0.5 ** 1 and rates[7][group] == lr * 0.5   # after milestone 6
        assert rates[9][group] == lr * 0.5 ** 2                        # after milestone 8


def test_boxinst_cosine_is_the_shared_one():
    module = _module("boxinst", BOXINST_TINY, ["optim.lr=0.01", "optim.schedule=cosine", "optim.warmup_steps=1",
                                               "trainer.max_steps=5", "boxinst.solver.milestones=[2]"])
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)         # the synthetic experiment's solver
    rates = _rates_per_step(config, epochs=1, steps_per_epoch=6)
    assert [r["heads"] for r in rates] == [0.01 * (1 / 2), 0.01 * 1.0, 0.01 * (0.5 * (1.0 + math.cos(math.pi * 0.25))),
                                           0.01 * (0.5 * (1.0 + math.cos(math.pi * 0.5))),
                                           0.01 * (0.5 * (1.0 + math.cos(math.pi * 0.75))), 0.0]


# ---------------------------------------------------------------------------------------- xmask

def _xmask_rates(module, epoch: int, step: int) -> dict[str, float]:
    """What `on_train_batch_start` writes into the optimizer at (epoch, global step)."""
    optimizer = module.configure_optimizers()
    module._trainer = SimpleNamespace(optimizers=[optimizer], current_epoch=epoch, global_step=step)
    module.on_train_batch_start(None, 0)
    return _rates(optimizer)


def test_xmask_phase_rates_times_the_steplr_decay_across_phase_boundaries():
    module = _module("xmask", XMASK_TINY, ["optim.lr=0.001", "optim.backbone_lr=0.0001", "optim.step_size=2",
                                           "optim.gamma=0.5", "xmask.phase1_end=3", "xmask.phase2_end=5",
                                           "xmask.phase2_lr=0.0002", "xmask.phase3_lr=null"])
    assert isinstance(module.configure_optimizers(), torch.optim.Adam)
    assert _xmask_rates(module, 0, 0) == {"encoder": 0.0001, "fuse": 0.001, "decoder": 0.001, "mask_head": 0.0}
    assert _xmask_rates(module, 1, 2) == {"encoder": 0.0001 * 0.5 ** 0, "fuse": 0.001 * 0.5 ** 0,
                                          "decoder": 0.001 * 0.5 ** 0, "mask_head": 0.0}
    # step 3 starts phase 2 (phase_unit step); epoch 2 has one decay
    assert _xmask_rates(module, 2, 3) == {"encoder": 0.0, "fuse": 0.0002 * 0.5 ** 1, "decoder": 0.0,
                                          "mask_head": 0.0002 * 0.5 ** 1}
    # phase 3 at step 5, its rate null = optim.lr; epoch 4 has two decays
    assert _xmask_rates(module, 4, 5) == {"encoder": 0.0, "fuse": 0.001 * 0.5 ** 2, "decoder": 0.001 * 0.5 ** 2,
                                          "mask_head": 0.0}


def test_xmask_cosine_multiplies_the_phase_rates():
    module = _module("xmask", XMASK_TINY, ["optim.lr=0.001", "optim.backbone_lr=0.0001", "optim.schedule=cosine",
                                           "optim.warmup_steps=2", "trainer.max_steps=10", "xmask.phase1_end=3",
                                           "xmask.phase2_end=5", "xmask.phase2_lr=0.0002"])
    assert _xmask_rates(module, 0, 1)["encoder"] == 0.0001 * (2 / 3)
    assert _xmask_rates(module, 0, 4) == {"encoder": 0.0, "fuse": 0.0002 * (0.5 * (1.0 + math.cos(math.pi * (2 / 8)))),
                                          "decoder": 0.0, "mask_head": 0.0002 * (0.5 * (1.0 + math.cos(math.pi * (2 / 8))))}


def test_xmask_phase_rate_zero_is_kept():
    """xmask.phase2_lr=0 freezes every group in phase 2 (only null means optim.lr)."""
    module = _module("xmask", XMASK_TINY, ["xmask.phase1_end=0", "xmask.phase2_lr=0.0"])
    assert set(_xmask_rates(module, 0, 0).values()) == {0.0}


# ---------------------------------------------------------------------------------- the builder

def _params(n: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(1)) for _ in range(n)]


def test_builder_names_groups_in_order_and_checks_its_arguments():
    optim = OptimConfig(lr=0.1, backbone_lr=0.01)
    config = build_optimizer({"b": _params(2), "a": _params(1)}, {"a": 0.5, "b": 0.25}, optim, total_steps=-1)
    assert [(g["name"], len(g["params"]), g["lr"]) for g in config["optimizer"].param_groups] == [("b", 2, 0.25),
                                                                                                  ("a", 1, 0.5)]
    with pytest.raises(ValueError, match="do not name"):
        make_optimizer({"a": _params(1)}, {"b": 0.1}, weight_decay=0.0)
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer({"a": _params(1)}, {"a": 0.1}, weight_decay=0.0, algorithm="sgd")
    with pytest.raises(ValueError, match="trainer.max_steps"):
        build_optimizer({"a": _params(1)}, {"a": 0.1}, OptimConfig(schedule="cosine"), total_steps=-1)
    assert schedule_factor(OptimConfig(step_size=3, gamma=0.5), epoch=7, step=0, total_steps=-1) == 0.5 ** 2


def test_warmup_multistep_by_hand():
    f = lambda step: warmup_multistep(step, milestones=[20, 30], gamma=0.1, warmup_steps=10, warmup_factor=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(20) == pytest.approx(0.1) and f(35) == pytest.approx(0.01)


def test_every_method_that_trains_accepts_the_cosine():
    for name, method in METHODS.items():
        if method.trains:
            cfg = load_config(ROOT / "experiments" / name / "synthetic.yaml",
                              ["optim.schedule=cosine", "trainer.max_steps=10"])
            assert cfg.optim.schedule == "cosine"
