"""What a newcomer trips on (issue 21): counts of the images really used, the skip policy in predict,
a finished run left alone, the run directory said up front, errors that name their file and key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowdseg.cli import main
from crowdseg.config import load_config
from crowdseg.train import evaluate, train
from data_fixtures import make_cclabeler

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "p2p" / "synthetic.yaml"
POINTS = {f"img{k}": [(10.0 + k, 12.0), (40.0, 30.0 + k)] for k in range(6)}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a cut-off download: the header still reads


@pytest.fixture
def crowd_with_a_truncated_image(tmp_path) -> Path:
    root = make_cclabeler(tmp_path / "cc", POINTS)
    truncate(root / "images" / "img3.jpg")
    return root


def test_skipped_image_is_in_no_count_or_list(crowd_with_a_truncated_image, tiny_overrides, caplog):
    overrides = tiny_overrides + ["data.name=cclabeler", f"data.root={crowd_with_a_truncated_image}",
                                  "data.train_split=all", "data.crop_size=32", "data.on_bad_annotation=skip",
                                  "data.val_fraction=34"]   # 2 of the 6 images are val
    result = train(load_config(EXPERIMENT, overrides))
    run = Path(result["run_dir"])
    labeled = (run / "splits" / "labeled.txt").read_text().split()
    val = (run / "splits" / "val.txt").read_text().split()
    assert "img3.jpg" not in labeled + val and len(labeled) + len(val) == 5
    record = json.loads((run / "metrics" / "val.json").read_text())["labels"]
    assert record["labeled_images"] == len(labeled) and record["val_images"] == len(val)
    assert f"labeled_images: {len(labeled)}" in (run / "config.yaml").read_text()
    assert "kept" in caplog.text


def test_predict_on_a_folder_follows_the_skip_policy(crowd_with_a_truncated_image, tiny_overrides):
    cfg = load_config(EXPERIMENT, tiny_overrides + ["trainer.fast_dev_run=true"])
    train(cfg)
    images = crowd_with_a_truncated_image / "images"
    assert main(["predict", str(EXPERIMENT), *tiny_overrides, "--images", str(images)]) == 2
    skipping = load_config(EXPERIMENT, tiny_overrides + ["data.on_bad_annotation=skip"])
    out = Path(evaluate(skipping, "predict", images=str(images))["predictions"])
    assert sorted(p.name for p in out.glob("img*.json")) == [f"img{k}.json" for k in range(6) if k != 3]


def test_a_finished_run_is_reported_and_left_alone(tiny_overrides, capsys):
    cfg = load_config(EXPERIMENT, tiny_overrides)
    first = train(cfg)
    run = Path(first["run_dir"])
    assert f"[crowdseg] run: {run} (new run)" in capsys.readouterr().out
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = train(load_config(EXPERIMENT, tiny_overrides))
    assert "is complete (step" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "a rerun changed the run"
    assert again["val/mae"] == first["val/mae"] and again["global_step"] == first["global_step"]
    evaluate(load_config(EXPERIMENT, tiny_overrides), "test")
    records = {split: json.loads((run / "metrics" / f"{split}.json").read_text()) for split in ("val", "test")}
    assert records["test"]["labels"]["val_images"] == records["val"]["labels"]["val_images"] == 2
    # extending the budget still resumes, and says from which step
    longer = train(load_config(EXPERIMENT, tiny_overrides + ["trainer.max_epochs=2"]))
    assert f"(resuming from step {first['global_step']})" in capsys.readouterr().out
    assert longer["global_step"] == 2 * first["global_step"]


def test_a_new_run_says_why_before_training(tiny_overrides, capsys):
    train(load_config(EXPERIMENT, tiny_overrides))
    capsys.readouterr()
    train(load_config(EXPERIMENT, tiny_overrides + ["optim.lr=3e-4"]))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[crowdseg] run:"))
    assert "p2p-synthetic-lf100-s0-" in line and "holds other settings: optim.backbone_lr" in line and "optim.lr" in line
    assert out.index("[crowdseg] run:") < out.index("[crowdseg] validation at step")


def test_a_corrupt_last_checkpoint_says_the_way_out(tiny_overrides, capsys):
    run = Path(train(load_config(EXPERIMENT, tiny_overrides))["run_dir"])
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"not a checkpoint")
    assert main(["fit", str(EXPERIMENT), *tiny_overrides, "trainer.max_epochs=2"]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "ckpt_path" not in err and "delete it" in err and "run_name" in err


def test_a_value_out_of_range_in_a_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(f"extends: {EXPERIMENT}\ndata:\n  batch_size: 0\n")
    assert main(["config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"crowdseg: error: {path}: key 'data.batch_size': must be >= 1, got 0"
    assert main(["config", str(path), "data.batch_size=2", "data.hflip=3"]) == 2
    assert "command-line override: key 'data.hflip'" in capsys.readouterr().err


def test_a_missing_data_root_names_the_key(tmp_path, capsys):
    assert main(["fit", str(ROOT / "experiments/p2p/shb_cpu.yaml"), f"data.root={tmp_path / 'nope'}",
                 f"runs_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "key 'data.root'" in err and str(tmp_path / "nope") in err
    assert not (tmp_path / "p2p").exists()


def test_the_console_is_quiet(tiny_overrides, capsys):
    import warnings

    from crowdseg.console import progress_bar, quiet_lightning
    from crowdseg.runs import build_loggers

    cfg = load_config(EXPERIMENT, tiny_overrides + ["logger.wandb.mode=offline"])
    wandb_logger = build_loggers(cfg, Path(cfg.runs_root) / "x")[-1]
    # Lightning's private init kwargs: wandb warns on every run when `anonymous` is passed at all
    assert "anonymous" not in wandb_logger._wandb_init and wandb_logger._wandb_init["id"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        warnings.warn("Checkpoint directory /r/checkpoints exists and is not empty.", UserWarning)
        warnings.warn("It is recommended to use `self.log('val/mae', ..., sync_dist=True)` when logging", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    assert progress_bar(True) is False  # stderr is captured here, not a terminal
    assert progress_bar(False) is False
