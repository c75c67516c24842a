"""XMask's experiment switches (issue 18): a fixed teacher's targets move the student, the oracle feeds the
unlabeled images' true points, count errors on unlabeled crops, init_ckpt for student and teacher, the
evaluated network, the teacher's BatchNorm statistics, one validation grid for both arms of a comparison."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crowdseg.errors import ConfigError
from datamodules.types import collate_samples
from xmask_fixtures import tiny_datamodule, tiny_module


def _unlabeled_batch(seed: int = 0) -> dict:
    dm = tiny_datamodule(seed=seed)
    return collate_samples([dm.unlabeled[i] for i in range(2)])


def test_the_unlabeled_loss_moves_the_student_toward_a_fixed_teachers_targets():
    """Two fixed, known teachers from the same start, one seeing 16 people per crop and one seeing 1:
    the student taught by the first ends predicting far more people (logit mass and cells > 0)."""
    batch = _unlabeled_batch()
    batch.pop("cutout")                                      # every cell counts
    grid = torch.tensor([[8.0 + 12 * i, 8.0 + 12 * j] for i in range(4) for j in range(4)])
    targets = {"sixteen": [grid, grid], "one": [torch.tensor([[32.0, 32.0]])] * 2}

    def taught_by(name: str) -> tuple[float, int]:
        module = tiny_module(unit="step", phase1_end=100, phase2_end=100, seed=0)
        module._phase = 1
        module._teacher_targets = lambda logits, image_size: targets[name]
        optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-3)
        for _ in range(20):
            loss, _ = module._phase1_semi(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = module.model(batch["image_strong"])["logits"]
        return float(logits.sigmoid().sum()), int((logits > 0).sum())

    (mass_16, cells_16), (mass_1, cells_1) = taught_by("sixteen"), taught_by("one")
    assert mass_16 > 10 * mass_1 and cells_16 > cells_1 + 10     # measured: 43 vs 0.4 and 29 vs 0 cells


@pytest.mark.parametrize("oracle", [False, True])
def test_the_oracle_feeds_the_true_points_and_both_count_errors_are_logged(oracle):
    module = tiny_module(unit="step", phase1_end=100, phase2_end=100, oracle=oracle)
    module._phase = 1
    batch = _unlabeled_batch()
    teacher_points = [torch.zeros(0, 2), torch.tensor([[4.0, 4.0]])]
    module._teacher_targets = lambda logits, image_size: teacher_points
    seen = {}

    def p2r(logits, targets, weights=None):
        seen["targets"] = targets
        return logits.sum() * 0.0

    module.p2r.forward = p2r
    _, logs = module._phase1_semi(batch)
    expected = batch["points"] if oracle else teacher_points
    assert len(seen["targets"]) == 2
    for got, want in zip(seen["targets"], expected):
        assert torch.equal(got, want)
    true = torch.tensor([float(len(p)) for p in batch["points"]])
    assert float(logs["teacher_count_error"]) == pytest.approx(float((torch.tensor([0.0, 1.0]) - true).abs().mean()))
    assert float(logs["student_count_error"]) >= 0
    from crowdseg.lit.xmask import _UnlabeledCountErrors

    errors = _UnlabeledCountErrors(module.unlabeled_errors)
    assert errors.compute()["unlabeled_teacher_count_mae"] == pytest.approx(float(logs["teacher_count_error"]))
    errors.reset()
    assert errors.compute() == {}                            # nothing since the last validation: nothing logged


def test_target_threshold_keeps_only_confident_teacher_cells():
    module = tiny_module(target_threshold=2.0)
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, 1, 1], logits[0, 0, 2, 3] = 1.0, 3.0
    targets = module._teacher_targets(logits, torch.tensor([[32, 32]]))
    assert targets[0].tolist() == [[13.5, 9.5]]              # the cell at logit 3 only (column 3, row 2; stride 4)
    assert len(tiny_module()._teacher_targets(logits, torch.tensor([[32, 32]]))[0]) == 2   # published: logit >= 0


def test_init_ckpt_loads_student_and_teacher_and_refuses_another_method(tmp_path):
    from crowdseg.methods.xmask import load_start

    source = tiny_module(seed=1)
    with torch.no_grad():
        for p in source.teacher.module.parameters():
            p.add_(1.0)                                       # a teacher that differs from its student
    path = tmp_path / "supervised.ckpt"
    torch.save({"state_dict": source.state_dict(), "crowdseg_config": "method: xmask\nseed: 0\n"}, path)
    module = tiny_module(seed=2)
    load_start(module, str(path))
    for (name, got), want in zip(module.model.state_dict().items(), source.model.state_dict().values()):
        assert torch.equal(got, want), name
    for (name, got), want in zip(module.teacher.module.state_dict().items(), source.teacher.module.state_dict().values()):
        assert torch.equal(got, want), name
    before = [p.clone() for p in module.teacher.module.parameters()]
    module.teacher.update_parameters(module.model)           # an EMA step, not a copy of the student
    assert not torch.equal(next(module.teacher.module.parameters()), next(module.model.parameters()))
    assert not torch.equal(next(module.teacher.module.parameters()), before[0])

    other = tmp_path / "p2p.ckpt"
    torch.save({"state_dict": source.state_dict(), "crowdseg_config": "method: p2p\n"}, other)
    with pytest.raises(ConfigError) as err:
        load_start(tiny_module(), str(other))
    assert str(err.value).count("\n") == 0 and "xmask.init_ckpt" in str(err.value) and "'p2p'" in str(err.value)


def test_a_checkpoint_without_a_teacher_starts_the_teacher_as_the_student(tmp_path):
    from crowdseg.methods.xmask import load_start

    source = tiny_module(seed=1)
    path = tmp_path / "weights.pt"
    torch.save({f"model.{k}": v for k, v in source.model.state_dict().items()}, path)
    module = tiny_module(seed=2)
    load_start(module, str(path))
    for got, want in zip(module.teacher.module.state_dict().values(), source.model.state_dict().values()):
        assert torch.equal(got, want)


def test_the_evaluated_network_selects_and_predicts():
    assert tiny_module().monitor == ("val/mae", "min")
    module = tiny_module(evaluate="teacher")
    assert module.monitor == ("val/teacher_mae", "min")
    with torch.no_grad():
        for p in module.teacher.module.parameters():
            p.zero_()                                         # a teacher that predicts nobody
    batch = {"image": torch.rand(1, 3, 64, 64), "image_size": torch.tensor([[64, 64]]), "meta": [{"name": "a"}],
             "points": [torch.zeros(0, 2)]}
    module.eval()
    assert module.predict_step(batch, 0)[0]["count"] == 0
    with pytest.raises(ValueError, match="evaluate"):
        tiny_module(evaluate="teacher", eval_teacher=False)


def test_teacher_batchnorm_statistics_copied_or_averaged():
    copied, averaged = tiny_module(), tiny_module(teacher_buffers="ema")
    for module in (copied, averaged):
        module.model.train()
        module.model(torch.rand(2, 3, 64, 64))               # moves the student's running statistics
        module.teacher.update_parameters(module.model)        # the first update copies everything
        module.model(torch.rand(2, 3, 64, 64) * 3)
        module.teacher.update_parameters(module.model)
    mean = lambda m: next(b for n, b in m.named_buffers() if n.endswith("running_mean"))  # noqa: E731
    assert torch.equal(mean(copied.teacher.module), mean(copied.model))
    assert not torch.equal(mean(averaged.teacher.module), mean(averaged.model))


# ---------------------------------------------------------------------------------------- one step grid
XMASK_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "xmask"
# every shipped comparison: (the semi-supervised recipe, its twins that differ in one switch)
PAIRS = [("synthetic.yaml", ["synthetic_supervised.yaml"]),
         ("shb_cpu.yaml", ["shb_cpu_supervised.yaml", "shb_cpu_oracle.yaml"]),
         ("sha_cpu.yaml", ["sha_cpu_supervised.yaml", "sha_cpu_oracle.yaml"])]


def _grid(cfg) -> tuple:
    t = cfg.trainer
    return t.check_val_every_n_epoch, t.val_check_interval, t.max_steps


@pytest.mark.parametrize("semi,twins", PAIRS, ids=[p[0] for p in PAIRS])
def test_both_arms_of_every_shipped_pair_validate_on_one_step_grid(semi, twins):
    """Validation counted in optimizer steps (an epoch is unlabeled batches in one arm, labeled ones in the
    other), with the same interval and budget; the twins differ from the recipe in one xmask switch only."""
    from omegaconf import OmegaConf

    from crowdseg.config import load_config
    from test_config import _flat

    base = load_config(XMASK_EXPERIMENTS / semi)
    assert base.trainer.check_val_every_n_epoch is None and isinstance(base.trainer.val_check_interval, int)
    flat = _flat(OmegaConf.to_container(base, resolve=True))
    for twin in twins:
        cfg = load_config(XMASK_EXPERIMENTS / twin)
        assert _grid(cfg) == _grid(base)
        changed = {k for k, v in _flat(OmegaConf.to_container(cfg, resolve=True)).items() if flat.get(k) != v}
        assert changed - {"name"} in ({"xmask.semi"}, {"xmask.unlabeled_targets"}), (twin, changed)


def test_the_two_arms_validate_at_identical_steps(tmp_path):
    """Run both arms of the synthetic pair for a few steps: the steps at which they validate are equal,
    although one arm's epoch is 8 combined batches and the other's 2 labeled batches."""
    from lightning.pytorch.callbacks import Callback

    from crowdseg.config import load_config
    from crowdseg.train import train

    class ValidationSteps(Callback):
        def __init__(self):
            self.steps = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.steps.append(trainer.global_step)

    tiny = ["data.synthetic.num_train=20", "data.synthetic.num_val=4", "data.synthetic.num_test=2",
            "data.synthetic.height=64", "data.synthetic.width=64", "data.synthetic.max_people=10", "data.crop_size=64",
            "data.batch_size=2", "data.eval_batch_size=2", "data.label_fraction=20", "xmask.semi_warmup=0",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "logger.wandb.mode=disabled", f"runs_root={tmp_path}"]
    seen = {}
    for name in ("synthetic.yaml", "synthetic_supervised.yaml"):
        steps = ValidationSteps()
        train(load_config(XMASK_EXPERIMENTS / name, tiny), callbacks=[steps])
        seen[name] = steps.steps
    assert seen["synthetic.yaml"] == seen["synthetic_supervised.yaml"]
    assert seen["synthetic.yaml"][:2] == [2, 4]


def test_cutout_cells_cover_a_padded_view():
    """A strong view smaller than the batch's largest: its kept-cell map is padded to the logits' size
    with 0 (padding is not image), and a cutout cell is 0 too."""
    module = tiny_module()
    stride = module.model.stride
    cutout = torch.zeros(1, 3 * stride, 2 * stride, dtype=torch.bool)
    cutout[0, :stride, :stride] = True
    kept = module._kept_cells(cutout, (4, 3))
    assert kept.shape == (1, 4, 3)
    assert kept[0].tolist() == [[0, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("dataset", ["shb", "sha"])
def test_stage_two_starts_from_the_last_checkpoint_of_its_own_stage_one(dataset):
    """`<d>_cpu*.yaml` start (xmask.init_ckpt) where `<d>_cpu_warmup.yaml` of the same seed and runs_root
    writes its last.ckpt (the run name holds the real label % of the planned split)."""
    from crowdseg.config import load_config
    from crowdseg.runs import run_dir
    from crowdseg.train import plan_run

    for seed in (0, 2):
        overrides = [f"seed={seed}", "runs_root=/somewhere"]
        warmup, _ = plan_run(load_config(XMASK_EXPERIMENTS / f"{dataset}_cpu_warmup.yaml", overrides))
        assert not warmup.xmask.semi and warmup.xmask.init_ckpt is None
        for arm in ("", "_supervised", "_oracle"):
            cfg = load_config(XMASK_EXPERIMENTS / f"{dataset}_cpu{arm}.yaml", overrides)
            assert cfg.xmask.init_ckpt == str(run_dir(warmup) / "checkpoints" / "last.ckpt")
