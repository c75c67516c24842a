"""What a run prints: Lightning's advertising tips, its FLOPs-less model table and the warnings it
repeats every run are kept off the console; crowdseg prints one line per model instead."""
from __future__ import annotations

import logging
import sys
import warnings

from torch import nn

# (category, message regex) of warnings that say nothing actionable about a crowdseg run
QUIET_WARNINGS = (
    (Warning, r".*isinstance\(treespec, LeafSpec\)"),  # Lightning vs. torch 2.13 pytree deprecation
    (UserWarning, r"Found \d+ module\(s\) in eval mode"),  # frozen SAM / teacher modules are meant to be
    (UserWarning, r"The number of training batches .* is smaller than the logging interval"),
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),  # every resumed run's, by design
    # epoch-level values crowdseg logs are torchmetrics results, already reduced over the DDP ranks
    (Warning, r"It is recommended to use `self.log\(.*sync_dist=True\)`"),
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Idempotent: drop Lightning's tips and the `QUIET_WARNINGS`."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def model_line(module: nn.Module) -> str:
    """`model: PointPredictor, 3.6 M parameters (3.6 M trainable)` for the module's main network."""
    net = getattr(module, "model", module)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return f"[crowdseg] model: {type(net).__name__}, {total / 1e6:.1f} M parameters ({trainable / 1e6:.1f} M trainable)"


def progress_bar(enabled: bool) -> bool:
    """Progress bars only on a terminal: written to a log file, tqdm's redraws are noise (a run
    without bars prints one line per validation instead, crowdseg.train.ValidationStep)."""
    return bool(enabled) and sys.stderr.isatty()
