"""Method modules, per-method configs, label fractions, the val carve and self-describing checkpoints."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from crowdseg.cli import main
from crowdseg.config import load_config
from crowdseg.data import build_datamodule, plan_split
from crowdseg.errors import ConfigError, DataError
from crowdseg.methods import METHODS
from crowdseg.train import build_job, build_trainer, train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "sweeps" not in p.parts)
CITY = SHARED / "cityuhkx_bev_cclabeler_json"
SHA = SHARED / "shanghaitech" / "part_A"
SHB = SHARED / "shanghaitech" / "part_B"
P2P = ROOT / "experiments" / "p2p" / "synthetic.yaml"


def tiny_version(path: Path, runs_root: Path) -> list[str]:
    """Overrides that turn any experiment into a few tiny synthetic images and small models."""
    cfg = load_config(path)
    overrides = [f"runs_root={runs_root}", "data.name=synthetic", "data.root=null", "data.num_workers=0",
                 "data.val_fraction=0", "data.labeled_list=null", "data.label_fraction=50", "data.masks_dir=null",
                 "data.cache_dir=null", "data.max_size=null", "data.batch_size=2", "data.crop_size=64",
                 "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.num_test=2",
                 "data.synthetic.height=64", "data.synthetic.width=64", "data.synthetic.max_people=8",
                 "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.fast_dev_run=true"]
    for key, value in (("model.pretrained", "null"), ("model.backbone", "resnet10t"), ("model.fpn_channels", 16),
                       ("model.head_channels", 16), ("density.channels", "[16]"), ("sam.model_type", "tiny"),
                       ("sam.checkpoint", "null"), ("rps.proposer_ckpt", "null"), ("boxinst.model.pretrained", "null"),
                       ("boxinst.model.backbone", "resnet18"), ("boxinst.init_ckpt", "null"),
                       ("xmask.init_ckpt", "null"),
                       ("boxinst.eval_data.name", "null"), ("boxinst.train_images", "all")):
        if OmegaConf.select(cfg, key, default="absent") != "absent":
            overrides.append(f"{key}={value}")
    return overrides


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_experiment_builds_its_job(path, tmp_path):
    cfg = load_config(path, tiny_version(path, tmp_path / "runs"))
    method = METHODS[cfg.method]
    if not method.trains:
        with pytest.raises(ConfigError, match="crowdseg masks"):
            build_job(cfg, tmp_path / "run")
        return
    job = build_job(cfg, tmp_path / "run")
    trainer = build_trainer(cfg, tmp_path / "run", job)
    assert trainer.fast_dev_run and trainer.default_root_dir == str(tmp_path / "run")
    assert len(job.datamodule.datasets["train"]) > 0
    assert sum(p.numel() for p in job.module.parameters()) > 0


def test_config_holds_only_its_methods_sections():
    p2p = load_config(P2P)
    assert {"model", "loss", "mask_loss"} <= set(p2p) and not {"rps", "sam", "dpmo", "density"} & set(p2p)
    density = load_config(ROOT / "experiments/density/synthetic.yaml")
    assert "density" in density and "loss" not in density


@pytest.mark.parametrize("override, words", [
    ("rps.lr=0.1", "key 'rps.lr' belongs to method rps, not p2p"),
    ("sam.model_type=vit_b", "key 'sam.model_type' belongs to method rps / dpmo, not p2p"),
    ("density.activation=relu", "belongs to method density, not p2p"),
    ("method=p2q", "did you mean 'p2p'"),
    ("data.label_fraction=0", "key 'data.label_fraction'"),
    ("data.label_fraction=150", "key 'data.label_fraction'"),
    ("data.batch_size=0", "key 'data.batch_size'"),
    ("mask_loss.points=everywhere", "key 'mask_loss.points'"),
    ("loss.cls_loss=bce", "key 'loss.cls_loss'"),
    ("loss.match_on=nearest", "key 'loss.match_on'"),
    ("model.cls_prior=1.5", "key 'model.cls_prior'"),
    ("optim.ema_decay=1.0", "key 'optim.ema_decay'"),
    ("optim.schedule=linear", "key 'optim.schedule'"),
    ("trainer.max_steps=-1", "trainer.max_steps"),  # the demo is a cosine over max_steps: it needs them
])
def test_bad_keys_fail_at_load_time(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(P2P, [override])
    assert words in str(info.value)


def test_method_checks_run_at_load_time_and_leave_no_run_dir(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["fit", str(ROOT / "experiments/density/synthetic.yaml"), f"runs_root={runs}", "density.activation=tanh"])
    assert code == 2
    assert "key 'density.activation': 'tanh' is not one of softplus, relu" in capsys.readouterr().err
    assert not runs.exists()


def test_extends_accepts_a_list(tmp_path):
    (tmp_path / "a.yaml").write_text("method: p2p\ndata:\n  batch_size: 3\n  crop_size: 96\n")
    (tmp_path / "b.yaml").write_text("data:\n  batch_size: 5\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\noptim:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.data.batch_size, cfg.data.crop_size, cfg.optim.lr) == (5, 96, 0.5)


def test_help_lists_the_registry(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in METHODS)


# ------------------------------------------------------------------------------------------- splits

def city(overrides=()):
    return load_config(P2P, ["data.name=cclabeler", f"data.root={CITY}", "data.train_split=all",
                             "data.val_split=all", "data.test_split=all", *overrides])


def test_label_fraction_trains_on_the_labeled_images_only():
    cfg = city(["data.val_fraction=10", "data.label_fraction=10", "data.split_seed=0"])
    split = plan_split(cfg)
    assert len(split.val) == 10 and len(split.labeled) == 9 and len(split.unlabeled) == 83  # 102 = 10 + 92
    datamodule = build_datamodule(cfg)
    train = set(datamodule.datasets["train"].names)
    assert train == set(split.labeled)
    assert set(datamodule.datasets["val"].names) == set(split.val)
    assert not set(split.val) & (train | set(split.unlabeled))
    # nested: the 10 % labeled images are inside the 40 % ones, and the val carve does not move
    forty = plan_split(city(["data.val_fraction=10", "data.label_fraction=40"]))
    assert set(split.labeled) < set(forty.labeled) and forty.val == split.val
    other_seed = plan_split(city(["data.val_fraction=10", "data.label_fraction=10", "data.split_seed=1"]))
    assert other_seed.val == split.val and other_seed.labeled != split.labeled


def test_protocol_list_with_a_blank_first_line_loads():
    protocol = SHARED / "xmask_protocols" / "sha-40.txt"
    assert protocol.read_text().startswith("\n")
    cfg = load_config(P2P, ["data.name=sha", f"data.root={SHA}", f"data.labeled_list={protocol}",
                            "data.val_fraction=10"])
    split = plan_split(cfg)
    assert len(split.labeled) == 120 and len(split.val) == 30 and len(split.unlabeled) == 150
    assert split.labeled_sha256 == hashlib.sha256(protocol.read_bytes()).hexdigest()
    assert not set(split.val) & set(split.labeled)


def test_a_listed_image_the_dataset_lacks_is_named(tmp_path):
    listing = tmp_path / "labeled.txt"
    listing.write_text("IMG_1.jpg\nIMG_999.jpg\n")
    cfg = load_config(P2P, ["data.name=sha", f"data.root={SHA}", f"data.labeled_list={listing}"])
    with pytest.raises(DataError, match=r"labeled.txt:2: IMG_999.jpg \(data.labeled_list\) is not an image"):
        plan_split(cfg)


def test_name_lists_narrow_a_split(tmp_path):
    names = sorted(p.name for p in (CITY / "images").iterdir())
    (tmp_path / "train.txt").write_text("\n".join(names[:20]) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(names[18:25]) + "\n")  # two also in the train list
    cfg = city([f"data.train_list={tmp_path / 'train.txt'}", f"data.val_list={tmp_path / 'val.txt'}"])
    datamodule = build_datamodule(cfg)
    assert sorted(datamodule.datasets["train"].names) == names[:18]  # val images are carved out
    assert sorted(datamodule.datasets["val"].names) == names[18:25]


def test_shanghaitech_duplicates_are_dropped_and_counted(caplog):
    from datamodules.dataset import build_dataset

    dataset = build_dataset("shb", str(SHB), "train")
    assert len(dataset) == 400
    report = caplog.text
    assert "dropped 38 point(s) in 14 image(s)" in report
    with pytest.raises(DataError, match="duplicate point"):
        build_dataset("shb", str(SHB), "train", on_duplicate_points="fail")


def test_mean_baseline_counts_whole_training_images():
    from crowdseg.train import mean_count_baseline

    cfg = city(["data.val_fraction=20", "data.crop_size=32"])
    datamodule = build_datamodule(cfg)
    train = datamodule.datasets["train"]
    whole = [len(r.points) for r in train.records]
    assert train.point_counts() == whole
    mean = sum(whole) / len(whole)
    val = [len(r.points) for r in datamodule.datasets["val"].records]
    assert mean_count_baseline(datamodule) == pytest.approx(sum(abs(v - mean) for v in val) / len(val))
    assert mean_count_baseline(datamodule) == mean_count_baseline(datamodule)


# ------------------------------------------------------------------------------ runs and checkpoints

def test_fraction_run_records_what_it_used_and_a_checkpoint_alone_tests(tiny_overrides, capsys):
    cfg = load_config(P2P, tiny_overrides + ["data.synthetic.num_train=20", "data.label_fraction=10"])
    result = train(cfg)
    run = Path(result["run_dir"])
    assert run.name == "p2p-synthetic-lf10-s0"
    stored = OmegaConf.load(run / "config.yaml")
    assert (stored.labels.labeled_images, stored.labels.unlabeled_images) == (2, 18)
    assert (run / "splits" / "labeled.txt").read_text().count("\n") == 2
    assert stored.labels.labeled_sha256 == hashlib.sha256((run / "splits" / "labeled.txt").read_bytes()).hexdigest()
    val = json.loads((run / "metrics" / "val.json").read_text())
    assert val["labels"]["labeled_images"] == 2 and "val/mae" in val["metrics"]

    best = run / "checkpoints" / "best.ckpt"
    assert main(["test", "--ckpt", str(best), "trainer.enable_progress_bar=false"]) == 0
    out = capsys.readouterr().out
    assert f"with {best}" in out
    test = json.loads((run / "metrics" / "test.json").read_text())
    assert test["checkpoint"] == str(best) and test["images"] == 2 and "test/mae" in test["metrics"]
    # a second evaluation with another checkpoint keeps the first one's result
    assert main(["test", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "trainer.enable_progress_bar=false"]) == 0
    again = json.loads((run / "metrics" / "test.json").read_text())
    assert again["checkpoint"].endswith("last.ckpt") and again["previous"]["checkpoint"] == str(best)


def test_predict_writes_points_for_a_folder(tiny_overrides, tmp_path):
    cfg = load_config(P2P, tiny_overrides + ["trainer.fast_dev_run=true"])
    run = Path(train(cfg)["run_dir"])
    out = tmp_path / "predictions"
    images = sorted((CITY / "images").iterdir())[:2]
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main(["predict", "--ckpt", str(ckpt), "--images", str(folder), "--out", str(out),
                 "trainer.enable_progress_bar=false", "trainer.fast_dev_run=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2
    for image in images:
        record = json.loads((out / f"{image.stem}.json").read_text())
        assert record["name"] == image.name and record["count"] == len(record["points"])


def test_show_to_an_unwritable_path_is_one_line(tiny_overrides, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["show", str(P2P), *tiny_overrides, "--n", "1", "--out", str(blocker / "x.png")]) == 2
    assert "--out: cannot write" in capsys.readouterr().err
