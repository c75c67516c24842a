"""A run directory holds one configuration: changed settings start a new run, extensions resume."""
from __future__ import annotations

from pathlib import Path

import pytest

from crowdseg.config import load_config, to_yaml
from crowdseg.errors import ConfigError
from crowdseg.runs import base_run_dir, config_differences, run_dir

ROOT = Path(__file__).resolve().parents[1]
P2P = ROOT / "experiments" / "p2p" / "synthetic.yaml"


def stored_run(tmp_path: Path, *overrides: str) -> Path:
    cfg = load_config(P2P, [f"runs_root={tmp_path}", *overrides])
    path = base_run_dir(cfg)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


def test_same_or_extended_settings_resume_the_run(tmp_path):
    base = stored_run(tmp_path)
    for extra in ([], ["trainer.max_steps=576"], ["trainer.enable_progress_bar=false", "data.num_workers=0",
                                                   "logger.wandb.mode=offline", "trainer.devices=2"]):
        assert run_dir(load_config(P2P, [f"runs_root={tmp_path}", *extra])) == base


def test_a_changed_setting_starts_a_new_run_named_by_its_hash(tmp_path):
    base = stored_run(tmp_path)
    lr = run_dir(load_config(P2P, [f"runs_root={tmp_path}", "optim.lr=3e-4"]))
    assert lr.parent == base.parent and lr.name.startswith(base.name + "-") and len(lr.name) == len(base.name) + 7
    assert run_dir(load_config(P2P, [f"runs_root={tmp_path}", "optim.lr=3e-4"])) == lr          # deterministic
    assert run_dir(load_config(P2P, [f"runs_root={tmp_path}", "optim.lr=1e-2"])) != lr
    shorter = run_dir(load_config(P2P, [f"runs_root={tmp_path}", "trainer.max_epochs=3"]))   # 9 -> 3 is not an extension
    assert shorter != base


def test_an_explicit_run_name_with_other_settings_fails_listing_the_keys(tmp_path):
    stored_run(tmp_path, "run_name=mine")
    with pytest.raises(ConfigError, match=r"optim.lr \(0.001 -> 0.0003\)"):
        run_dir(load_config(P2P, [f"runs_root={tmp_path}", "run_name=mine", "optim.lr=3e-4"]))


def test_naming_an_unnamed_run_is_not_a_changed_setting(tmp_path):
    """run_name chooses the directory: naming the default run with its own name resumes it, and
    another setting under that name lists only that setting."""
    base = stored_run(tmp_path)
    assert run_dir(load_config(P2P, [f"runs_root={tmp_path}", f"run_name={base.name}"])) == base
    with pytest.raises(ConfigError) as info:
        run_dir(load_config(P2P, [f"runs_root={tmp_path}", f"run_name={base.name}", "optim.lr=3e-4"]))
    assert "optim.lr" in str(info.value) and "run_name (" not in str(info.value)


def test_config_differences_ignore_observers_only():
    stored = {"optim": {"lr": 1.0}, "trainer": {"max_epochs": 5, "log_every_n_steps": 10}, "labels": {"fraction": 10}}
    now = {"optim": {"lr": 1.0}, "trainer": {"max_epochs": 8, "log_every_n_steps": 1}, "labels": {"fraction": 11}}
    assert config_differences(stored, now) == {}
    now["optim"]["lr"] = 2.0
    assert config_differences(stored, now) == {"optim.lr": (1.0, 2.0)}
