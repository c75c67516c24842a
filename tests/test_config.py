from pathlib import Path

import pytest

from crowdseg.config import load_config
from crowdseg.config.load import experiment_name
from crowdseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_experiment_composes(path):
    cfg = load_config(path)
    assert cfg.name == experiment_name(path)
    assert cfg.method


def test_experiments_exist():
    assert any(p.name == "synthetic.yaml" for p in EXPERIMENTS)


def test_override_and_extends(tmp_path):
    base = tmp_path / "experiments" / "base.yaml"
    base.parent.mkdir()
    base.write_text("method: p2p\ndata:\n  batch_size: 4\noptim:\n  lr: 0.5\n")
    child = base.parent / "child.yaml"
    child.write_text("extends: base.yaml\ndata:\n  batch_size: 6\n")
    cfg = load_config(child, ["optim.lr=0.25", "trainer.max_epochs=3"])
    assert cfg.data.batch_size == 6          # the child wins over its base
    assert cfg.optim.lr == 0.25              # overrides win over files
    assert cfg.trainer.max_epochs == 3
    assert cfg.name == "child"


@pytest.mark.parametrize("override, expected", [
    (["data.batchsize=3"], "unknown key 'data.batchsize'; did you mean 'data.batch_size'?"),
    (["optim.lr=fast"], "key 'optim.lr'"),
    (["logger.wandb.mode=onlin"], "did you mean 'online'"),
    (["seed"], "not of the form key=value"),
    (["trainr.max_epochs=1"], "did you mean 'trainer'"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(ROOT / "experiments/p2p/synthetic.yaml", override)
    assert expected in str(info.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: p2p\nmodel:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "did you mean 'model.backbone'" in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("method: p2p\ndata:\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert f"{bad}:" in str(info.value) and "malformed YAML" in str(info.value)


def test_missing_file_and_extends_loop(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_sweep_style_argv_is_parsed_as_overrides():
    """wandb's `${args_no_hyphens}` passes plain key=value words after the experiment."""
    from crowdseg.cli import _experiment_parser
    argv = ["experiments/p2p/synthetic.yaml", "optim.lr=0.0003", "seed=2", "data.label_fraction=10"]
    args = _experiment_parser("fit").parse_args(argv)
    cfg = load_config(ROOT / args.experiment, args.overrides)
    assert (cfg.optim.lr, cfg.seed, cfg.data.label_fraction) == (0.0003, 2, 10.0)


def test_sweep_files_use_plain_overrides():
    import yaml
    sweeps = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
    assert sweeps, "no sweep files"
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        assert "${args_no_hyphens}" in sweep["command"], path
        experiment = next(c for c in sweep["command"] if str(c).endswith(".yaml"))
        overrides = [f"{k}={spec['values'][0] if 'values' in spec else spec.get('value', spec.get('min'))}"
                     for k, spec in sweep["parameters"].items()]
        load_config(ROOT / experiment, overrides)  # every swept key exists and has the right type


def test_masks_dir_is_per_split():
    from crowdseg.data import masks_dir_of
    cfg = load_config(ROOT / "experiments/p2p/synthetic.yaml", ["data.masks_dir=/m/sha/{split}"])
    assert masks_dir_of(cfg, "train") == "/m/sha/train" and masks_dir_of(cfg, "test") == "/m/sha/test"


# Keys added since tests/data/resolved_experiments.json was written; they must not change an old value.
ADDED_KEYS = {"optim.backbone_lr_scale", "data.sources", "labels.sources", "boxinst.train_images", "xmask.evaluate",
              "xmask.teacher_buffers", "xmask.unlabeled_targets", "xmask.target_threshold"}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_experiment_resolves_as_recorded(path):
    """Refactors keep behaviour: each experiment resolves to the settings recorded in
    tests/data/resolved_experiments.json (a deliberate change of an experiment updates its entry)."""
    import json

    from omegaconf import OmegaConf

    recorded = json.loads((ROOT / "tests" / "data" / "resolved_experiments.json").read_text())
    key = str(path.relative_to(ROOT))
    assert key in recorded, f"{key} has no recorded settings: add its entry"
    now = {k: v for k, v in _flat(OmegaConf.to_container(load_config(path), resolve=True)).items() if k not in ADDED_KEYS}
    changed = {k: (recorded[key].get(k), now.get(k)) for k in set(now) | set(recorded[key]) if recorded[key].get(k) != now.get(k)}
    assert not changed, f"{key}: recorded -> now {changed}"


def test_backbone_rate_follows_lr_unless_set(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("method: p2p\noptim:\n  lr: 1.0e-3\n")
    assert load_config(path).optim.backbone_lr == pytest.approx(1e-4)          # default scale 0.1
    assert load_config(path, ["optim.lr=3e-4"]).optim.backbone_lr == pytest.approx(3e-5)
    assert load_config(path, ["optim.backbone_lr_scale=1"]).optim.backbone_lr == 1e-3
    assert load_config(path, ["optim.backbone_lr=5e-4", "optim.lr=3e-4"]).optim.backbone_lr == 5e-4  # set: kept
    # the demo: changing "the learning rate" moves the backbone's too
    assert load_config(ROOT / "experiments/p2p/synthetic.yaml", ["optim.lr=3e-4"]).optim.backbone_lr == 3e-4
    assert load_config(path).optim.backbone_lr == 1e-4  # no float noise (1e-3 x 0.1 = 0.00010000000000000002)
