"""Starting weights from a crowdseg checkpoint: the one loader behind `rps.proposer_ckpt` and
`boxinst.init_ckpt`. torch is imported when a checkpoint is loaded, not when a config is."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crowdseg.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def load_weights(model: "nn.Module", path: str | Path, key: str, prefixes: Sequence[str] = ("model.",),
                 hint: str = "", method: str | None = None) -> None:
    """Load into `model` the weights that the checkpoint at `path` (a Lightning `.ckpt`, or a state
    dict saved with `torch.save`) holds under the first of `prefixes` it has, the prefix removed.

    Every failure is a ConfigError naming `key`, the config key that gave `path`: a missing file
    (with `hint`, how to make one), an unreadable one, a crowdseg checkpoint of another method than
    `method` (when given), none of the prefixes, weights that do not fit.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"key '{key}': checkpoint not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a checkpoint at all
        raise ConfigError(f"key '{key}': {path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    trained_by = _method_of(checkpoint)
    if method is not None and trained_by is not None and trained_by != method:
        raise ConfigError(f"key '{key}': {path} is a checkpoint of method {trained_by!r}, not {method!r}")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    weights = next((w for w in (_under(state, prefix) for prefix in prefixes) if w), None)
    if weights is None:
        raise ConfigError(f"key '{key}': {path} holds no {' or '.join(f'`{p}*`' for p in prefixes)} weights")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"key '{key}': {path} does not fit the model of this config ({first})") from None


def _method_of(checkpoint: Any) -> str | None:
    """The `method` of the run that wrote a crowdseg checkpoint (its stored config), None for others."""
    import yaml

    from crowdseg.io import CONFIG_KEY

    text = checkpoint.get(CONFIG_KEY) if isinstance(checkpoint, dict) else None
    stored = yaml.safe_load(text) if isinstance(text, str) else None
    return stored.get("method") if isinstance(stored, dict) else None


def _under(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of `state` whose key starts with `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
