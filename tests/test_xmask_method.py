"""`method: xmask` through the real experiment configs: checks, build, and `train` under fast_dev_run."""
from pathlib import Path

import pytest

from crowdseg.config import load_config
from crowdseg.errors import ConfigError, DataError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "xmask"
TINY = ["data.synthetic.num_train=20", "data.synthetic.num_val=4", "data.synthetic.num_test=2",
        "data.synthetic.height=64", "data.synthetic.width=64", "data.synthetic.max_people=15",
        "data.crop_size=64", "data.batch_size=2", "data.eval_batch_size=2", "data.label_fraction=20",
        "model.fuse_channels=8", "model.decoder_channels=8", "model.mask_channels=8", "model.emb_dim=4",
        "logger.num_pictures=0", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("name", ["synthetic", "synthetic_supervised", "sha", "sha_cpu", "qnrf", "jhu"])
def test_every_experiment_loads(name):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    assert cfg.method == "xmask"


@pytest.mark.parametrize("override, key", [("xmask.phase_unit=hour", "xmask.phase_unit"),
                                           ("xmask.phase2_end=10", "xmask.phase2_end"),
                                           ("xmask.phase2_groups=[fuse,head]", "xmask.phase2_groups"),
                                           ("xmask.p_low=0.95", "xmask.p_low"),
                                           ("xmask.ema_momentum=1.5", "xmask.ema_momentum")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(EXPERIMENTS / "synthetic.yaml", [override])


def test_build_semi_and_supervised_datamodules(tmp_path):
    from crowdseg.methods.xmask import build_datamodule
    from datamodules.semi import SemiSupervisedDataModule

    cfg = load_config(EXPERIMENTS / "synthetic.yaml", TINY + [f"runs_root={tmp_path}"])
    dm = build_datamodule(cfg)
    assert isinstance(dm, SemiSupervisedDataModule)
    lab, unl = set(dm.labeled.names), set(dm.unlabeled.names)
    assert len(lab) and len(unl) and not lab & unl and not (lab | unl) & set(dm.datasets["val"].names)
    sample = dm.unlabeled[0]
    assert {"image", "image_strong", "cutout"} <= set(sample)
    sup = build_datamodule(load_config(EXPERIMENTS / "synthetic_supervised.yaml", TINY))
    assert set(sup.datasets["train"].names) == lab  # the control trains on the same labeled images


def test_labeled_images_without_masks_are_refused_past_phase1(tmp_path):
    from crowdseg.methods.xmask import build_datamodule, reaches_phase2
    from data_fixtures import make_cclabeler

    root = make_cclabeler(tmp_path / "cc", {f"img{k}": [(10.0 + k, 12.0)] for k in range(6)})
    cclabeler = TINY + ["data.name=cclabeler", f"data.root={root}", "data.train_split=all", "data.test_split=all",
                        "xmask.semi=false", f"runs_root={tmp_path}"]
    with pytest.raises(DataError, match=r"instance masks of the labeled images, and img\d\.jpg has none"):
        build_datamodule(load_config(EXPERIMENTS / "synthetic.yaml", cclabeler))
    cfg = load_config(EXPERIMENTS / "sha_cpu.yaml")
    assert not reaches_phase2(cfg)
    assert reaches_phase2(load_config(EXPERIMENTS / "sha.yaml"))


def test_fit_fast_dev_run_on_the_synthetic_experiment(tmp_path):
    from crowdseg.train import train

    cfg = load_config(EXPERIMENTS / "synthetic.yaml",
                      TINY + [f"runs_root={tmp_path}", "trainer.fast_dev_run=true", "xmask.semi_warmup=-1",
                              "xmask.ramp_rate=1.0"])
    metrics = train(cfg)
    assert metrics["train/semi_weight"] > 0
    assert {"val/mae", "val/teacher_mae", "val/mean_iou_c"} <= set(metrics)


@pytest.mark.slow
def test_crash_inside_phase2_and_rerun(tmp_path):
    """A run that dies after step 5 (phase 2 starts at step 2): last.ckpt (step 4) holds phase 2's optimizer
    state and a teacher equal to an uninterrupted 4-step run's; rerunning the same config finishes the
    budget. (A real SIGKILL of a child adds nothing here: tests/test_exact_resume.py kills children.)"""
    import torch
    from lightning.pytorch.callbacks import Callback

    from crowdseg.train import train

    class Crash(RuntimeError):
        pass

    class CrashAfterStep5(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 5:
                raise Crash

    overrides = TINY + ["xmask.phase1_end=2", "xmask.phase2_end=100", "xmask.semi_warmup=-1", "xmask.ramp_rate=1.0",
                        "checkpoint_every_n_steps=2", "trainer.max_steps=6", "trainer.limit_val_batches=0"]
    reference = train(load_config(EXPERIMENTS / "synthetic.yaml",
                                  overrides + [f"runs_root={tmp_path / 'ref'}", "trainer.max_steps=4"]))
    ref_state = torch.load(reference["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]

    cfg = load_config(EXPERIMENTS / "synthetic.yaml", overrides + [f"runs_root={tmp_path / 'run'}"])
    with pytest.raises(Crash):
        train(cfg, callbacks=[CrashAfterStep5()])
    last = next((tmp_path / "run").rglob("last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4 and state["xmask_optimizer_phase"] == 2
    assert int(state["state_dict"]["teacher.n_averaged"]) == 4
    worst = max(float((value.float() - ref_state[key].float()).abs().max()) for key, value in state["state_dict"].items()
                if key.startswith("teacher.") and value.numel())
    assert worst < 1e-5, worst

    done = train(cfg)
    assert done["global_step"] == 6
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 and final["xmask_optimizer_phase"] == 2
    assert int(final["state_dict"]["teacher.n_averaged"]) == 6
