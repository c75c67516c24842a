"""Load an experiment: YAML files (with `extends:`) and `key=value` overrides merged onto the schema.

Order: schema defaults < the `extends:` chain (base first) < the experiment file < overrides.
Every problem raises `ConfigError` with one line naming the file (or the override) and the key,
and, for an unknown key, the closest valid one.
"""
from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from crowdseg.config.schema import ExperimentConfig
from crowdseg.errors import ConfigError

EXTENDS_KEY = "extends"

# Keys whose value must be one of a few words; checked after merging.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("p2p", "density", "rps", "xmask", "boxinst", "dpmo"),
    "logger.wandb.mode": ("online", "offline", "disabled"),
    "data.on_bad_annotation": ("fail", "skip", "drop"),
    "data.photometric": ("none", "weak", "strong"),
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the experiment at `path` with `overrides` (["a.b=1", ...]) into a typed DictConfig."""
    path = Path(path)
    cfg = OmegaConf.structured(ExperimentConfig)
    for layer_path, layer in _extends_chain(path):
        cfg = _merge(cfg, layer, f"{layer_path}")
    cfg = _merge(cfg, _parse_overrides(overrides), "command-line override")
    if OmegaConf.is_missing(cfg, "name"):
        cfg.name = experiment_name(path)
    _check_choices(cfg)
    _check_missing(cfg)
    return cfg


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
    """[(file, its keys without `extends`)], the root base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    data = _read_yaml(path)
    base = data.pop(EXTENDS_KEY, None)
    chain: list[tuple[Path, dict[str, Any]]] = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: `extends` must be a file path, got {base!r}")
        chain = _extends_chain(path.parent / base, seen + (path,))
    return chain + [(path, data)]


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides: {err.msg if hasattr(err, 'msg') else err}") from None


def _merge(cfg: DictConfig, layer: dict[str, Any], source: str) -> DictConfig:
    _check_known_keys(layer, ExperimentConfig, source, prefix="")
    try:
        return OmegaConf.merge(cfg, layer)
    except ValidationError as err:
        raise ConfigError(f"{source}: key '{err.full_key}': {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{source}: {'key ' + repr(key) + ': ' if key else ''}{_first_line(str(err))}") from None


def _check_known_keys(layer: Any, schema: type, source: str, prefix: str) -> None:
    """Unknown keys fail with the closest valid key; recurses into nested dataclass sections."""
    if not isinstance(layer, dict):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        sub = _dataclass_type(known[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{full}' is a section; expected a mapping, got {value!r}")
            _check_known_keys(value, sub, source, prefix=f"{full}.")


def _dataclass_type(f: Any) -> type | None:
    default_factory = f.default_factory
    if callable(default_factory):
        try:
            value = default_factory()
        except TypeError:
            return None
        return type(value) if is_dataclass(value) else None
    return None


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(allowed)}{hint}")


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value for key '{missing[0]}'")


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


__all__ = ["load_config", "experiment_name", "to_yaml", "CHOICES", "ConfigKeyError", "MissingMandatoryValue"]
