"""`load_weights`, the one loader of starting weights (`rps.proposer_ckpt`, `boxinst.init_ckpt`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from crowdseg.errors import ConfigError
from crowdseg.methods.weights import load_weights


def saved(path, state):
    torch.save(state, path)
    return path


def test_the_first_prefix_present_wins_in_a_lightning_or_plain_checkpoint(tmp_path):
    donor, model = nn.Linear(2, 3), nn.Linear(2, 3)
    lightning = saved(tmp_path / "a.ckpt", {"state_dict": {f"proposer.{k}": v for k, v in donor.state_dict().items()}
                                            | {"scorer.weight": torch.zeros(1)}})
    load_weights(model, lightning, "rps.proposer_ckpt", prefixes=("model.", "proposer."))
    assert torch.equal(model.weight, donor.weight) and torch.equal(model.bias, donor.bias)
    plain = saved(tmp_path / "b.pt", {f"model.{k}": v + 1 for k, v in donor.state_dict().items()})
    load_weights(model, plain, "boxinst.init_ckpt")
    assert torch.equal(model.weight, donor.weight + 1)


def test_every_failure_names_the_key(tmp_path):
    model = nn.Linear(2, 3)
    with pytest.raises(ConfigError, match=r"key 'k': checkpoint not found: .*no\.ckpt \(train it first\)"):
        load_weights(model, tmp_path / "no.ckpt", "k", hint="train it first")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="key 'k': .*text.ckpt is not a readable checkpoint"):
        load_weights(model, tmp_path / "text.ckpt", "k")
    other = saved(tmp_path / "other.ckpt", {"state_dict": {"other.weight": torch.zeros(1)}})
    with pytest.raises(ConfigError, match=r"key 'k': .* holds no `model\.\*` or `proposer\.\*` weights"):
        load_weights(model, other, "k", prefixes=("model.", "proposer."))
    wide = saved(tmp_path / "wide.ckpt", {"state_dict": {f"model.{k}": v for k, v in nn.Linear(4, 3).state_dict().items()}})
    with pytest.raises(ConfigError, match="key 'k': .* does not fit the model of this config"):
        load_weights(model, wide, "k")
