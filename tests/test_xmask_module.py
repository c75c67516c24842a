"""XMask model, schedule and LightningModule: EMA teacher, checkpoints, phase switching, fast_dev_run."""
import copy

import lightning as L
import pytest
import torch

from crowdseg.models.xmask import count_cells, logit_points
from crowdseg.xmask.schedule import PhaseSchedule, group_learning_rates
from xmask_fixtures import tiny_datamodule, tiny_module, tiny_net, trainer_kwargs


def test_model_shapes_count_and_unit_embeddings():
    net = tiny_net().eval()
    out = net(torch.rand(2, 3, 64, 96))
    assert out["logits"].shape == (2, 1, 16, 24) and out["embedding"].shape == (2, 8, 16, 24)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(2, 16, 24), atol=1e-4)
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[0, 0, 0, 1] = logits[0, 0, 3, 3] = 2.0
    assert count_cells(logits).item() == 2
    assert count_cells(logits, torch.tensor([[8, 8]])).item() == 1  # cell (3, 3) is centred at 13.5
    assert logit_points(logits[0])[0].tolist() == [[5.5, 1.5], [13.5, 13.5]]


def test_schedule_phases_weights_and_rates():
    s = PhaseSchedule(unit="epoch", phase1_end=10, phase2_end=20, semi_warmup=2, ramp_rate=0.5, ramp_max=2.0)
    assert s.position(0, 999) == (1, 0) and s.position(12, 0) == (2, 2) and s.position(25, 0) == (3, 5)
    assert s.semi_weight(1, 1) == 0.0 and s.semi_weight(1, 3) == 0.5 and s.semi_weight(1, 100) == 2.0
    assert s.semi_weight(3, 0) == pytest.approx(0.1) and s.semi_weight(3, 2) == pytest.approx(1.1)
    lrs = {p: {g: float(p) for g in ("encoder", "fuse", "decoder", "mask_head")} for p in (1, 2, 3)}
    assert group_learning_rates(s, 2, lrs) == {"encoder": 0.0, "fuse": 2.0, "decoder": 0.0, "mask_head": 2.0}
    assert group_learning_rates(s, 3, lrs, decay=0.5) == {"encoder": 0.0, "fuse": 1.5, "decoder": 1.5, "mask_head": 0.0}
    with pytest.raises(ValueError):
        PhaseSchedule(groups={1: ("encoder", "head")})


def test_teacher_is_a_frozen_eval_copy_and_follows_the_ema():
    module = tiny_module(ema_momentum=0.9)
    module.train()
    assert not module.teacher.training and all(not p.requires_grad for p in module.teacher.parameters())
    start = {k: v.clone() for k, v in module.teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    module.teacher.update_parameters(module.model)  # first update: copy (AveragedModel's n_averaged == 0)
    module.teacher.update_parameters(module.model)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    module.teacher.update_parameters(module.model)
    name, teacher_p = next(iter(module.teacher.module.named_parameters()))
    student_p = dict(module.model.named_parameters())[name]
    # t = 0.9 * (s0 + 1) + 0.1 * (s0 + 2) = s0 + 1.1
    assert torch.allclose(teacher_p, start[name] + 1.1, atol=1e-5)
    assert torch.allclose(student_p, start[name] + 2.0, atol=1e-5)
    # buffers are copied from the student, not averaged
    bn = [k for k in start if k.endswith("running_mean")][0]
    assert torch.equal(module.teacher.module.state_dict()[bn], module.model.state_dict()[bn])


def _params(module, group):
    return [p.detach().clone() for p in module.model.groups()[group].parameters()]


def _changed(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def test_phase_switching_changes_exactly_the_trainable_groups():
    L.seed_everything(0)
    module = tiny_module(unit="step", phase1_end=1, phase2_end=2)
    datamodule = tiny_datamodule()
    changes, lrs = [], []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = {g: _params(pl_module, g) for g in ("encoder", "fuse", "decoder", "mask_head")}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changes.append({g: _changed(self.before[g], _params(pl_module, g)) for g in self.before})
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    logged = []

    class Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(max_steps=3, callbacks=[Watch(), Log()], **trainer_kwargs())
    trainer.fit(module, datamodule=datamodule)
    assert [m["train/phase"] for m in logged] == [1.0, 2.0, 3.0]
    assert all(m["train/semi_weight"] > 0 for m in logged)  # every phase ran its unlabeled branch
    assert "train/semi_pull" in logged[1] and "train/semi_mc_unit_mass" in logged[2]
    assert changes[0] == {"encoder": True, "fuse": True, "decoder": True, "mask_head": False}
    assert changes[1] == {"encoder": False, "fuse": True, "decoder": False, "mask_head": True}
    assert changes[2] == {"encoder": False, "fuse": True, "decoder": True, "mask_head": False}
    assert lrs[0]["mask_head"] == 0 and lrs[1]["encoder"] == 0 and lrs[1]["decoder"] == 0 and lrs[2]["mask_head"] == 0
    assert lrs[0]["encoder"] == pytest.approx(1e-4) and lrs[1]["mask_head"] == pytest.approx(1e-3)
    # the frozen encoder ran in eval mode; the teacher always does
    assert not module.model.backbone.training and not module.teacher.training


def test_checkpoint_restores_teacher_phase_and_optimizer(tmp_path):
    L.seed_everything(0)
    module = tiny_module(unit="step", phase1_end=1, phase2_end=10)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, **trainer_kwargs())
    trainer.fit(module, datamodule=tiny_datamodule())
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    assert any(k.startswith("teacher.module.") for k in state["state_dict"])
    assert int(state["state_dict"]["teacher.n_averaged"]) == 2

    restored = tiny_module(unit="step", phase1_end=1, phase2_end=10, seed=1)
    assert not torch.equal(next(restored.teacher.parameters()), next(module.teacher.parameters()))
    resumed = L.Trainer(max_steps=2, default_root_dir=tmp_path, **trainer_kwargs())
    resumed.fit(restored, datamodule=tiny_datamodule(), ckpt_path=str(path))  # nothing left to do: just restores
    for (k, a), b in zip(module.teacher.state_dict().items(), restored.teacher.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.global_step == 2 and restored.current_phase() == (2, 1)
    opt_a = trainer.optimizers[0].state_dict()
    opt_b = resumed.optimizers[0].state_dict()
    assert [g["name"] for g in opt_b["param_groups"]] == ["encoder", "fuse", "decoder", "mask_head"]
    k = next(iter(opt_a["state"]))
    assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])


def test_fast_dev_run_with_evaluation(tmp_path):
    L.seed_everything(0)
    module = tiny_module(unit="step", phase1_end=0, phase2_end=1)  # one step, in phase 2
    trainer = L.Trainer(fast_dev_run=True, **trainer_kwargs(limit_val_batches=None))
    trainer.fit(module, datamodule=tiny_datamodule())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"val/mae", "val/teacher_mae", "val/sigma_l_f1", "val/mean_iou_c", "val/teacher_mean_iou_c"} <= set(metrics)


def test_supervised_control_ignores_the_unlabeled_branch():
    module = tiny_module(semi=False, unit="step", phase1_end=5, phase2_end=5)
    dm = tiny_datamodule()
    dm.trainer = None
    batch = {"labeled": next(iter(torch.utils.data.DataLoader(dm.labeled, batch_size=2,
                                                                collate_fn=__import__("datamodules.types", fromlist=["x"]).collate_samples)))}
    module._phase = 1
    out = module.compute_losses(batch)
    assert out["semi_weight"] == 0 and "semi" not in out


def test_phase2_without_labeled_masks_names_the_image():
    from crowdseg.errors import DataError
    module = tiny_module(unit="step", phase1_end=0, phase2_end=5)
    batch = {"image": torch.rand(1, 3, 64, 64), "image_size": torch.tensor([[64, 64]]),
             "points": [torch.tensor([[10.0, 10.0]])], "instance_map": None, "meta": [{"name": "IMG_7.jpg"}]}
    with pytest.raises(DataError, match="IMG_7.jpg"):
        module.compute_losses(batch)
