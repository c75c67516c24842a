"""`crowdseg masks`: outputs, resume after a kill, and a 2-process DDP run (synthetic crowd, tiny SAM)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crowdseg.config import load_config
from crowdseg.data import build_dataset
from crowdseg.dpmo.writer import check_unique_stems, masks_dir, run_masks
from crowdseg.errors import ConfigError, DataError
from datamodules.readers.idmaps import read_id_map
from data_fixtures import make_jhu

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "dpmo" / "synthetic.yaml"
VOLATILE = ("timings", "rank", "world_size")


def overrides(tmp_path: Path, images: int, *extra: str) -> list[str]:
    return [f"runs_root={tmp_path / 'runs'}", f"data.synthetic.num_train={images}", "trainer.enable_progress_bar=false",
            *extra]


def outputs(out_dir: Path) -> dict[str, object]:
    """Every finished file of a mask folder: PNG -> array, JSON -> dict without the volatile keys."""
    found: dict[str, object] = {}
    for path in sorted(out_dir.rglob("*")):
        if path.name.startswith(".") or path.is_dir():
            continue
        key = str(path.relative_to(out_dir))
        if path.suffix == ".png":
            found[key] = read_id_map(path)
        elif path.suffix == ".json":
            found[key] = {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}
        else:
            found[key] = path.stat().st_size > 0
    return found


def assert_same_outputs(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def test_masks_outputs_match_the_points_and_a_rerun_skips(tmp_path):
    cfg = load_config(EXPERIMENT, overrides(tmp_path, 3, "dpmo.overlays=true"))
    out = masks_dir(cfg)
    assert out == tmp_path / "runs" / "dpmo" / "synthetic" / "masks" / "train"
    out.mkdir(parents=True)
    stale = out / ".train_00000.png.k2j3.tmp.png"
    stale.write_bytes(b"half a png")                          # what a killed run can leave behind
    result = run_masks(cfg)
    assert result["images"] == 3 and result["written"] == 3 and result["skipped"] == 0
    assert result["masks_on_disk"] == 3 and not stale.exists()
    # training's Trainer without a run's records: no logs, checkpoints or wandb id beside the masks
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".png", ".json")) == ["overlays", "settings.yaml"]
    dataset = build_dataset(cfg, "train")
    for i in range(3):
        sample = dataset[i]
        stem = Path(sample["meta"]["name"]).stem
        id_map = read_id_map(out / f"{stem}.png")
        points = sample["points"].numpy()
        h, w = sample["image"].shape[-2:]
        assert id_map.shape == (h, w) and id_map.max() <= len(points)
        rows = np.clip(np.round(points[:, 1]).astype(int), 0, h - 1)
        cols = np.clip(np.round(points[:, 0]).astype(int), 0, w - 1)
        assert (id_map[rows, cols] == np.arange(1, len(points) + 1)).all()
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["num_points"] == len(points) and summary["name"] == sample["meta"]["name"]
        assert summary["sam_model_type"] == "tiny" and summary["split"] == "train" and summary["rank"] == 0
        assert set(summary["timings"]) == {"encoder_s", "decoder_s", "post_s", "total_s"}
        assert (out / "overlays" / f"{stem}.jpg").stat().st_size > 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_masks(cfg)
    assert again["written"] == 0 and again["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # other dpmo settings: the masks on disk are stale, every image is made again
    changed = run_masks(load_config(EXPERIMENT, overrides(tmp_path, 3, "dpmo.overlays=true", "dpmo.radius_factor=0.5")))
    assert changed["written"] == 3 and changed["skipped"] == 0
    assert "radius_factor: 0.5" in (out / "settings.yaml").read_text()


def test_masks_of_real_images_load_back_as_instance_maps(tmp_path, shared_data):
    """CityUHK-X images through `crowdseg masks`, then read back by the dataset as `instance_map`."""
    source = shared_data / "cityuhkx_bev_cclabeler_json"
    root = tmp_path / "city"
    for stem in ("scene_001_1", "scene_041_2", "scene_026_2"):
        for folder, suffix in (("images", ".jpg"), ("jsons", ".json")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{stem}{suffix}").symlink_to(source / folder / f"{stem}{suffix}")
    data = ["data.name=cclabeler", f"data.root={root}", "dpmo.split=all",
            f"data.masks_dir={tmp_path / 'runs' / 'masks_elsewhere'}"]     # ignored while making masks
    cfg = load_config(EXPERIMENT, overrides(tmp_path, 1, *data))
    result = run_masks(cfg)
    assert result["images"] == 3 and result["written"] == 3
    out = Path(result["out_dir"])
    reread = load_config(EXPERIMENT, overrides(tmp_path, 1, "data.name=cclabeler", f"data.root={root}",
                                               f"data.masks_dir={out.parent}/{{split}}"))
    dataset = build_dataset(reread, "all")
    assert len(dataset) == 3
    for i in range(3):
        sample = dataset[i]
        instance_map = sample["instance_map"].numpy()
        np.testing.assert_array_equal(instance_map, read_id_map(out / f"{Path(sample['meta']['name']).stem}.png"))
        points = sample["points"].numpy()
        rows, cols = np.round(points[:, 1]).astype(int), np.round(points[:, 0]).astype(int)
        assert (instance_map[rows, cols] == np.arange(1, len(points) + 1)).all()
        assert instance_map.shape == (384, 512)


def test_joined_splits_get_one_mask_file_per_image(tmp_path):
    """JHU "train+val" has train/0001.jpg and val/0001.jpg: two mask files, each read back by its image."""
    root = make_jhu(tmp_path / "jhu")
    data = ["data.name=jhu", f"data.root={root}", "dpmo.split=train+val"]
    result = run_masks(load_config(EXPERIMENT, overrides(tmp_path, 1, *data)))
    out = Path(result["out_dir"])
    assert result["written"] == 3
    assert sorted(p.name for p in out.glob("*.png")) == ["train__0001.png", "train__0002.png", "val__0001.png"]
    dataset = build_dataset(load_config(EXPERIMENT, overrides(tmp_path, 1, *data, f"data.masks_dir={out}")), "train+val")
    counts = {dataset[i]["meta"]["name"]: int(dataset[i]["instance_map"].max()) for i in range(len(dataset))}
    assert counts == {"train/0001.jpg": 2, "train/0002.jpg": 0, "val/0001.jpg": 1}


def test_images_sharing_a_mask_file_are_refused():
    with pytest.raises(DataError, match=r"'crowd\.jpg' and 'crowd\.png' would both write .*crowd\.png"):
        check_unique_stems(["crowd.jpg", "other.jpg", "crowd.png"], Path("masks"))
    check_unique_stems(["train/0001.jpg", "val/0001.jpg"], Path("masks"))


def test_real_sam_types_need_a_checkpoint(tmp_path):
    cfg = load_config(EXPERIMENT, overrides(tmp_path, 1, "sam.model_type=vit_b"))
    with pytest.raises(ConfigError, match=r"key 'sam.checkpoint': model type vit_b needs a local checkpoint"):
        run_masks(cfg)
    missing = tmp_path / "nowhere" / "sam_vit_b_01ec64.pth"
    cfg = load_config(EXPERIMENT, overrides(tmp_path, 1, "sam.model_type=vit_b", f"sam.checkpoint={missing}"))
    with pytest.raises(ConfigError, match=r"sam.checkpoint .*nowhere/sam_vit_b_01ec64.pth: file not found; expected a vit_b"):
        run_masks(cfg)
    with pytest.raises(ConfigError, match="key 'dpmo.variant'"):   # checked when the config loads
        load_config(EXPERIMENT, overrides(tmp_path, 1, "dpmo.variant=edp"))


@pytest.mark.parametrize("name", ["sha", "shb", "qnrf", "jhu", "nwpu"])
def test_dataset_configs_compose(name):
    from crowdseg.dpmo import check_dpmo_config
    cfg = load_config(ROOT / "experiments" / "dpmo" / f"{name}.yaml", ["dpmo.split=test"])
    assert cfg.method == "dpmo" and cfg.data.name == name and cfg.data.root
    assert cfg.sam.model_type == "vit_b" and cfg.sam.checkpoint.endswith("sam_vit_b_01ec64.pth")
    assert cfg.data.max_size is None
    check_dpmo_config(cfg.dpmo)
    assert masks_dir(cfg) == Path("runs") / "dpmo" / name / "masks" / "test"


def _masks_command(tmp_path: Path, images: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "crowdseg", "masks", str(EXPERIMENT), *overrides(tmp_path, images, *extra)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_outputs(tmp_path):
    images = 4
    heavy = ("data.synthetic.min_people=30", "data.synthetic.max_people=40", "dpmo.overlays=true")
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_masks_command(killed_dir, images, *heavy), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = killed_dir / "runs" / "dpmo" / "synthetic" / "masks" / "train"
    deadline = time.time() + 240
    # finished outputs only: pathlib's glob also matches the hidden temporaries of atomic writes
    def finished(pattern="*.json"):
        return sorted(p for p in out.glob(pattern) if not p.name.startswith("."))

    while time.time() < deadline and proc.poll() is None and not finished():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = finished()
    assert 1 <= len(done) < images                                   # killed mid-run
    for path in finished("*.png"):                                   # finished names hold whole files
        assert read_id_map(path).shape == (256, 256)
    for path in done:
        json.loads(path.read_text())

    cfg = load_config(EXPERIMENT, overrides(killed_dir, images, *heavy))
    resumed = run_masks(cfg)
    assert resumed["skipped"] == len(done) and resumed["written"] == images - len(done)
    assert not [p for p in out.rglob(".*") if p.is_file()]          # no temporary files left

    clean = run_masks(load_config(EXPERIMENT, overrides(tmp_path / "clean", images, *heavy)))
    assert clean["written"] == images
    assert_same_outputs(outputs(out), outputs(Path(clean["out_dir"])))


@pytest.mark.slow
def test_two_process_ddp_writes_each_image_once(tmp_path):
    images = 3                                                        # uneven: rank 0 gets 2, rank 1 gets 1
    light = ("dpmo.tile=false",)
    cmd = _masks_command(tmp_path / "ddp", images, "trainer.accelerator=cpu", "trainer.devices=2",
                         "trainer.strategy=ddp", *light)
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["written"] == images and report["skipped"] == 0 and report["masks_on_disk"] == images
    out = tmp_path / "ddp" / "runs" / "dpmo" / "synthetic" / "masks" / "train"
    ranks = {p.stem: json.loads(p.read_text())["rank"] for p in out.glob("*.json")}
    # Lightning's predict sampler gives rank r the images r, r + 2, ...: each image to one rank
    assert ranks == {f"train_{i:05d}": i % 2 for i in range(images)}
    assert {json.loads(p.read_text())["world_size"] for p in out.glob("*.json")} == {2}
    single = run_masks(load_config(EXPERIMENT, overrides(tmp_path / "single", images, *light)))
    assert_same_outputs(outputs(out), outputs(Path(single["out_dir"])))
