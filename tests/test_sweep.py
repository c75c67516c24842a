"""`crowdseg sweep`: a sweep file's grid as plain `key=value` runs, each in its own run directory."""
from __future__ import annotations

from pathlib import Path

import pytest

from crowdseg.cli import main
from crowdseg.config import load_config
from crowdseg.runs import prepare_run_dir, run_dir
from crowdseg.sweep import commands, grid, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


def test_grid_and_commands_put_every_combination_in_place_of_the_wandb_arguments(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("command: [crowdseg, fit, e.yaml, '${args_no_hyphens}', trainer.fast_dev_run=true]\n"
                    "parameters:\n  optim.lr: {values: [1, 2]}\n  seed: {value: 3}\n  data.crop_size: {values: [64, 96]}\n")
    sweep = load_sweep(path)
    assert grid(sweep) == [["optim.lr=1", "seed=3", "data.crop_size=64"], ["optim.lr=1", "seed=3", "data.crop_size=96"],
                           ["optim.lr=2", "seed=3", "data.crop_size=64"], ["optim.lr=2", "seed=3", "data.crop_size=96"]]
    assert commands(sweep, ["seed=7"])[0] == ["fit", "e.yaml", "optim.lr=1", "seed=3", "data.crop_size=64", "seed=7",
                                              "trainer.fast_dev_run=true"]


def test_a_bad_sweep_file_names_its_key(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("command: [crowdseg, fit, e.yaml]\nparameters: {a: {values: [1]}}\n")
    assert main(["sweep", str(path)]) == 2
    assert "key 'command'" in capsys.readouterr().err
    path.write_text("command: [crowdseg, fit, e.yaml, '${args_no_hyphens}']\nparameters: {optim.lr: {values: []}}\n")
    assert main(["sweep", str(path)]) == 2
    assert "key 'parameters.optim.lr'" in capsys.readouterr().err


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_run_of_a_shipped_sweep_has_its_own_run_directory(path, tmp_path):
    """Run after run, as `crowdseg sweep` does: each resolves to a directory no earlier run holds (no two
    share settings, so none resumes another), and rerunning a combination finds its own directory."""
    runs = commands(load_sweep(path), [f"runs_root={tmp_path}"])
    assert len(runs) >= 2
    seen = []
    for command in runs:
        assert command[0] == "fit"
        cfg = load_config(ROOT / command[1], command[2:])
        where = run_dir(cfg)
        assert where not in seen, f"{command} would resume {where}"
        prepare_run_dir(cfg, path=where)
        seen.append(where)
    assert run_dir(load_config(ROOT / runs[1][1], runs[1][2:])) == seen[1]
