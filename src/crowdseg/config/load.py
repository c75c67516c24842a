"""Load an experiment: YAML files (with `extends:`) and `key=value` overrides merged onto the schema.

Order: schema defaults < the `extends:` chain (base first) < the experiment file < overrides.
Every problem raises `ConfigError` with one line naming the file (or the override) and the key,
and, for an unknown key, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from crowdseg.config.schema import ExperimentConfig
from crowdseg.errors import ConfigError

EXTENDS_KEY = "extends"

# Shared keys whose value must be one of a few words; checked after merging. A method's own
# choices are checked by its module (`Method.check`).
CHOICES: dict[str, tuple[str, ...]] = {
    "logger.wandb.mode": ("online", "offline", "disabled"),
    "data.on_bad_annotation": ("fail", "skip", "drop"),
    "data.on_duplicate_points": ("fail", "drop", "keep"),
    "data.photometric": ("none", "weak", "strong"),
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the experiment at `path` with `overrides` (["a.b=1", ...]) into a typed DictConfig."""
    path = Path(path)
    layers = [("the experiment's file name", {"name": experiment_name(path)})]  # a file may set its own
    layers += [(str(p), layer) for p, layer in _extends_chain(path)]
    layers.append(("command-line override", _parse_overrides(overrides)))
    return compose(layers)


def compose(layers: Sequence[tuple[str, dict[str, Any]]]) -> DictConfig:
    """Merge `(source, mapping)` layers, in order, onto the schema of the method they name, and check."""
    from crowdseg.methods import METHODS

    method = _method_name(layers)
    cfg = OmegaConf.structured(experiment_schema(method))
    for source, layer in layers:
        cfg = _merge(cfg, layer, source, method)
    _derive(cfg)
    try:
        _check_choices(cfg)
        _check_shared_values(cfg)
        METHODS[method].check(cfg)
        _check_missing(cfg)
    except ConfigError as err:
        source = _source_of_key(str(err), layers)
        raise (ConfigError(f"{source}: {err}") if source else err) from None
    return cfg


def _source_of_key(message: str, layers: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """The last layer (file or override) that sets the first key a check's message names, if any."""
    import re

    found = re.search(r"keys? '([\w.]+)'", message)
    if not found:
        return None
    source = None
    for layer_source, layer in layers:
        node: Any = layer
        for part in found.group(1).split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            source = layer_source
    return source


_ABSENT = object()


def _method_name(layers: Sequence[tuple[str, dict[str, Any]]]) -> str:
    from crowdseg.methods import METHODS

    name, source = ExperimentConfig.method, "the default"
    for layer_source, layer in layers:
        if isinstance(layer, dict) and "method" in layer:
            name, source = layer["method"], layer_source
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: key 'method': {name!r} is not one of {', '.join(METHODS)}{hint}")
    return name


@functools.lru_cache(maxsize=None)
def experiment_schema(method: str) -> type:
    """The config dataclass of a `method` run: the shared sections plus the method's own."""
    from crowdseg.methods import METHODS

    sections = METHODS[method].sections
    extra = [(name, schema, dataclasses.field(default_factory=schema)) for name, schema in sections.items()]
    schema = dataclasses.make_dataclass(_schema_name(method), extra, bases=(ExperimentConfig,))
    schema.__module__ = __name__  # found again by pickle through this module's __getattr__
    return schema


def _schema_name(method: str) -> str:
    return f"{method.capitalize()}Experiment"


def __getattr__(name: str) -> type:
    """`crowdseg.config.load.P2pExperiment` etc.: lets pickle (DDP spawn) find the per-method schemas."""
    from crowdseg.methods import METHODS

    for method in METHODS:
        if name == _schema_name(method):
            return experiment_schema(method)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def experiment_name(path: Path) -> str:
    """`experiments/p2p/synthetic.yaml` -> "p2p/synthetic" (the path below `experiments/`, no suffix)."""
    parts = path.resolve().with_suffix("").parts
    if "experiments" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("experiments"):])
    return path.stem


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _extends_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """[(file, its keys without `extends`)], bases first. `extends` names one file or a list of
    files (merged in order, a later one winning)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    data = _read_yaml(path)
    bases = data.pop(EXTENDS_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `extends` must be a file path or a list of file paths, got {bases!r}")
    chain: list[tuple[Path, dict[str, Any]]] = []
    for base in bases:
        chain += _extends_chain(path.parent / base, seen + (path,))
    return chain + [(path, data)]


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides: {err.msg if hasattr(err, 'msg') else err}") from None


def _merge(cfg: DictConfig, layer: dict[str, Any], source: str, method: str) -> DictConfig:
    _check_known_keys(layer, experiment_schema(method), source, prefix="", method=method)
    try:
        return OmegaConf.merge(cfg, layer)
    except ValidationError as err:
        raise ConfigError(f"{source}: key '{err.full_key}': {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{source}: {'key ' + repr(key) + ': ' if key else ''}{_first_line(str(err))}") from None


def _check_known_keys(layer: Any, schema: type, source: str, prefix: str, method: str) -> None:
    """Unknown keys fail with the method they belong to, or the closest valid key; recurses into
    nested dataclass sections."""
    from crowdseg.methods import section_owners

    if not isinstance(layer, dict):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if key not in known:
            owners = section_owners().get(str(key), []) if not prefix else []
            if owners:
                raise ConfigError(f"{source}: key '{_first_leaf(full, value)}' belongs to method "
                                  f"{' / '.join(owners)}, not {method}")
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        sub = _dataclass_type(known[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{full}' is a section; expected a mapping, got {value!r}")
            _check_known_keys(value, sub, source, prefix=f"{full}.", method=method)


def _first_leaf(key: str, value: Any) -> str:
    """'rps' + {'lr': 1} -> 'rps.lr': the first key a user wrote under a section."""
    while isinstance(value, dict) and value:
        sub, value = next(iter(value.items()))
        key = f"{key}.{sub}"
    return key


def _dataclass_type(f: Any) -> type | None:
    default_factory = f.default_factory
    if callable(default_factory):
        try:
            value = default_factory()
        except TypeError:
            return None
        return type(value) if is_dataclass(value) else None
    return None


def _derive(cfg: DictConfig) -> None:
    """Values that follow others unless set: `optim.backbone_lr` = `optim.lr` x `optim.backbone_lr_scale`."""
    if cfg.optim.backbone_lr is None:
        cfg.optim.backbone_lr = float(f"{cfg.optim.lr * cfg.optim.backbone_lr_scale:.12g}")  # no 1e-4 x 0.1 = 1.0000000000000001e-05


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(allowed)}{hint}")


def _check_shared_values(cfg: DictConfig) -> None:
    """Range checks of the shared sections (a method checks its own in `Method.check`)."""
    data = cfg.data
    if not 0 < data.label_fraction <= 100:
        raise ConfigError(f"key 'data.label_fraction': must be a percentage in (0, 100], got {data.label_fraction:g}")
    if not 0 <= data.val_fraction < 100:
        raise ConfigError(f"key 'data.val_fraction': must be a percentage in [0, 100), got {data.val_fraction:g}")
    if data.labeled_list is not None and data.label_fraction != 100:
        raise ConfigError("keys 'data.labeled_list' and 'data.label_fraction' both choose the labeled images; set one")
    for key in ("batch_size", "eval_batch_size"):
        if data[key] < 1:
            raise ConfigError(f"key 'data.{key}': must be >= 1, got {data[key]}")
    if data.num_workers < 0:
        raise ConfigError(f"key 'data.num_workers': must be >= 0, got {data.num_workers}")
    if data.crop_size is not None and data.crop_size < 1:
        raise ConfigError(f"key 'data.crop_size': must be >= 1 or null, got {data.crop_size}")
    if data.max_size is not None and data.max_size < 1:
        raise ConfigError(f"key 'data.max_size': must be >= 1 or null, got {data.max_size}")
    if len(data.scale_range) != 2 or not 0 < data.scale_range[0] <= data.scale_range[1]:
        raise ConfigError(f"key 'data.scale_range': expected [low, high] with 0 < low <= high, got {list(data.scale_range)}")
    if not 0 <= data.hflip <= 1:
        raise ConfigError(f"key 'data.hflip': must be a probability in [0, 1], got {data.hflip}")
    if cfg.optim.schedule not in ("step", "cosine"):
        raise ConfigError(f"key 'optim.schedule': {cfg.optim.schedule!r} is not one of step, cosine")
    if cfg.optim.schedule == "cosine" and cfg.trainer.max_steps < 1:
        raise ConfigError("key 'optim.schedule': cosine decays over trainer.max_steps; set it (>= 1)")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"key 'optim.warmup_steps': must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.optim.ema_decay is not None and not 0 < cfg.optim.ema_decay < 1:
        raise ConfigError(f"key 'optim.ema_decay': must be in (0, 1) or null, got {cfg.optim.ema_decay}")
    for key in ("lr", "backbone_lr", "backbone_lr_scale"):
        if cfg.optim[key] < 0:
            raise ConfigError(f"key 'optim.{key}': must be >= 0, got {cfg.optim[key]}")
    if cfg.optim.step_size < 1:
        raise ConfigError(f"key 'optim.step_size': must be >= 1, got {cfg.optim.step_size}")
    if cfg.trainer.max_epochs == 0 or cfg.trainer.max_steps == 0:
        raise ConfigError("keys 'trainer.max_epochs' / 'trainer.max_steps': 0 would train nothing")
    if cfg.checkpoint_every_n_steps < 1:
        raise ConfigError(f"key 'checkpoint_every_n_steps': must be >= 1, got {cfg.checkpoint_every_n_steps}")


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value for key '{missing[0]}'")


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


__all__ = ["load_config", "compose", "experiment_schema", "experiment_name", "to_yaml", "CHOICES", "ConfigKeyError", "MissingMandatoryValue"]
