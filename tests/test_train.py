"""End-to-end runs of the point predictor: fast_dev_run, kill-and-resume, bad input, DDP."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crowdseg.cli import _report, main
from crowdseg.config import load_config
from crowdseg.train import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "p2p" / "synthetic.yaml"


def test_fast_dev_run(tiny_overrides):
    cfg = load_config(EXPERIMENT, tiny_overrides + ["trainer.fast_dev_run=true"])
    result = train(cfg)
    assert result["global_step"] == 1
    assert "train/loss" in result and torch.isfinite(torch.tensor(result["train/loss"]))


def test_fast_dev_run_bf16_mixed(tiny_overrides):
    cfg = load_config(EXPERIMENT, tiny_overrides + ["trainer.fast_dev_run=true", "trainer.precision=bf16-mixed"])
    result = train(cfg)
    assert result["global_step"] == 1 and torch.isfinite(torch.tensor(result["train/loss"]))


@pytest.mark.parametrize("mae,words", [(7.0, "(75% lower)"), (56.0, "(100% higher)")])
def test_report_compares_with_the_mean_baseline(capsys, mae, words):
    _report({"val/mae": mae, "val/mae_mean_baseline": 28.0, "run_dir": "runs/x"})
    out = capsys.readouterr().out
    assert "run_dir: runs/x" in out and out.rstrip().endswith(
        f"validation MAE {mae:.2f} vs. 28.00 for always predicting the training mean count {words}")


def test_fit_then_test_writes_run_directory(tiny_overrides):
    cfg = load_config(EXPERIMENT, tiny_overrides)
    result = train(cfg)
    run = Path(result["run_dir"])
    assert run == Path(cfg.runs_root) / "p2p/synthetic" / "p2p-synthetic-lf100-s0"
    for name in ("config.yaml", "checkpoints/last.ckpt", "csv/metrics.csv", "wandb_id", "pictures/val_00.png"):
        assert (run / name).is_file(), name
    assert result["val/mae_mean_baseline"] >= 0 and "val/mae" in result
    metrics = evaluate(cfg, "test")
    assert {"test/mae", "test/rmse"} <= set(metrics)


def _ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_bad_input_exits_2_and_leaves_run_dir_alone(tmp_path, tiny_overrides, capsys):
    cfg = load_config(EXPERIMENT, tiny_overrides + ["trainer.fast_dev_run=true"])
    run = Path(train(cfg)["run_dir"])
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    assert main(["fit", str(EXPERIMENT), *tiny_overrides, "data.batchsize=2"]) == 2
    assert "did you mean 'data.batch_size'" in capsys.readouterr().err

    not_ckpt = tmp_path / "weights.ckpt"
    not_ckpt.write_text("hello")
    assert main(["test", str(EXPERIMENT), *tiny_overrides, f"ckpt_path={not_ckpt}"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert main(["test", str(EXPERIMENT), *tiny_overrides, f"ckpt_path={tmp_path / 'nope.ckpt'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err

    broken = tmp_path / "broken.yaml"
    broken.write_text("method: p2p\n  data: [\n")
    assert main(["fit", str(broken)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_unwritable_run_dir(tmp_path, tiny_overrides, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["fit", str(EXPERIMENT), *tiny_overrides, f"runs_root={blocker}"]) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp"])  # ddp_spawn through build_trainer: test_rps_module's DDP test
def test_two_process_ddp_run(tmp_path, tiny_overrides, strategy):
    overrides = tiny_overrides + ["trainer.devices=2", f"trainer.strategy={strategy}", "data.synthetic.num_train=16",
                                  "data.synthetic.num_val=4", f"runs_root={tmp_path / strategy}"]
    done = subprocess.run([sys.executable, "-m", "crowdseg", "fit", str(EXPERIMENT), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=400, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / strategy).glob("p2p/synthetic/*"))
    assert len(runs) == 1, "one run directory for all ranks"
    # global batch 4 over 2 ranks: 2 per rank, 16 images -> 8 images per rank -> 4 steps
    assert _ckpt_step(runs[0] / "checkpoints" / "last.ckpt") == 4
    assert "val/mae" in done.stdout


def test_wandb_offline_run_is_continued_on_resume(tiny_overrides):
    overrides = tiny_overrides + ["logger.wandb.mode=offline", "trainer.limit_val_batches=1"]
    first = train(load_config(EXPERIMENT, overrides))
    run = Path(first["run_dir"])
    run_id = (run / "wandb_id").read_text().strip()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    second = train(load_config(EXPERIMENT, overrides + ["trainer.max_epochs=2"]))
    assert second["global_step"] == 2 * first["global_step"]
    assert (run / "wandb_id").read_text().strip() == run_id
    # every wandb run directory of this run directory carries the same id
    assert {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}


def test_final_val_metrics_are_the_final_weights(tiny_overrides, capsys):
    """Validation every 2 epochs of a 3-epoch run: the run validates its final weights once more, so the
    printed / recorded val MAE is last.ckpt's (equal to `crowdseg validate --ckpt last.ckpt`)."""
    import json

    overrides = tiny_overrides + ["trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"]
    result = train(load_config(EXPERIMENT, overrides))
    record = json.loads((Path(result["run_dir"]) / "metrics" / "val.json").read_text())
    assert record["step"] == result["global_step"] == 6
    assert main(["validate", "--ckpt", result["checkpoint"]]) == 0
    again = json.loads((Path(result["run_dir"]) / "metrics" / "val.json").read_text())
    assert again["metrics"]["val/mae"] == pytest.approx(result["val/mae"], abs=1e-5)
    assert again["metrics"]["val/mae_mean_baseline"] == pytest.approx(result["val/mae_mean_baseline"])
    assert "settings" not in again                      # the run's own settings
    # the header names the checkpoint's step; no per-validation line claims "step 0"
    out = capsys.readouterr().out
    assert "(step 6)" in out and "validation at step 0" not in out
    # an evaluation with other settings says so in its record, and leaves the training log alone (a row
    # at Lightning's step 0 would read as a validation of the run in `crowdseg report`)
    log = (Path(result["run_dir"]) / "csv" / "metrics.csv").read_text()
    assert main(["validate", "--ckpt", result["checkpoint"], "loss.score_threshold=0.9"]) == 0
    assert (Path(result["run_dir"]) / "csv" / "metrics.csv").read_text() == log
    other = json.loads((Path(result["run_dir"]) / "metrics" / "val.json").read_text())
    assert other["settings"] == {"loss.score_threshold": 0.9} and "val/mae_mean_baseline" in other["metrics"]
