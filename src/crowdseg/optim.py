"""One builder of optimizers and learning-rate schedules for every method (the `optim` config section).

A method names its parameter groups and gives each a base rate, e.g. groups {"heads": ..., "backbone":
...} with rates {"heads": optim.lr, "backbone": optim.backbone_lr}; `build_optimizer` returns what
`LightningModule.configure_optimizers` returns:

    {"optimizer": one param group per name, in the groups' order (group["name"], group["lr"] = rate),
     "lr_scheduler": {"scheduler": a torch scheduler, "interval": "epoch" | "step"}}

The rate of group g is then rates[g] x factor, the factor set by `optim.schedule`:

- ``step`` (every method but boxinst): factor = gamma ** floor(epoch / step_size), torch's `StepLR`
  stepped once per epoch (the papers'); XMask, which sets its phase rates itself before every batch,
  takes the same factor in closed form from `schedule_factor`.
- ``step`` for boxinst, the one documented exception: detectron2's WarmupMultiStepLR, per optimizer
  step t: factor = gamma ** #{m in milestones : t >= m} x warm-up(t) (`warmup_multistep`), the
  milestones and warm-up from `boxinst.solver`; `optim.step_size` is not used.
- ``cosine`` (every method): per optimizer step t, factor = `warmup_cosine(t, optim.warmup_steps,
  total_steps)`, a linear warm-up then a cosine to 0 at `total_steps` = trainer.max_steps.

The step budget comes from the config (trainer.max_steps), not from
`trainer.estimated_stepping_batches`: that sets the training loader up before a resumed run's loader
state is restored, which breaks exact continuation. Factors are pure functions wrapped in
`functools.partial` (they pickle, and `LambdaLR.state_dict` stores nothing of them).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence

import torch
from torch import nn

ALGORITHMS = ("adam", "adamw", "sgd")


class ScheduleSettings(Protocol):
    """What the builder reads of the `optim` section (crowdseg.config.schema.OptimConfig)."""
    weight_decay: float
    schedule: str
    step_size: int
    gamma: float
    warmup_steps: int


class RateSettings(Protocol):
    """The shared rates of the `optim` section (backbone_lr is derived at load: lr x backbone_lr_scale)."""
    lr: float
    backbone_lr: float


class MilestoneSettings(Protocol):
    """A step schedule decayed at milestones (boxinst.solver: crowdseg.methods.boxinst.BoxInstSolverConfig)."""
    milestones: Sequence[int]
    warmup_steps: int
    warmup_factor: float


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Rate factor at optimizer step `step`: (step + 1) / (warmup_steps + 1) for step < warmup_steps
    (linear from 1 / (warmup + 1) to warmup / (warmup + 1)), then 0.5 (1 + cos(pi p)) with
    p = min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps)): 1 -> 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep(step: int, milestones: Sequence[int], gamma: float, warmup_steps: int,
                     warmup_factor: float) -> float:
    """detectron2's WarmupMultiStepLR factor at optimizer step `step`: gamma ** (milestones passed,
    step >= m), times warmup_factor (1 - a) + a with a = step / warmup_steps while step < warmup_steps
    (linear from `warmup_factor` at step 0 towards 1)."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def schedule_factor(optim: ScheduleSettings, epoch: int, step: int, total_steps: int) -> float:
    """The shared schedule's factor at a training position, in closed form, for a module that sets its
    groups' rates itself (XMask: phase rate x this factor, see crowdseg.lit.xmask).

    step: gamma ** (epoch // step_size); cosine: warmup_cosine(step, warmup_steps, total_steps), the
    value `LambdaLR` gives at scheduler step `step`. (`StepLR` multiplies the running rate by gamma at
    each boundary instead: the same after one decay, possibly one rounding apart after two or more.)
    """
    if optim.schedule == "cosine":
        return warmup_cosine(step, optim.warmup_steps, _total_steps(total_steps))
    return optim.gamma ** (epoch // optim.step_size)


def heads_and_backbone(model: nn.Module, backbone: nn.Module, trainable_only: bool = False
                       ) -> dict[str, list[nn.Parameter]]:
    """{"heads": the parameters of `model` outside `backbone`, "backbone": those inside it}, each in
    `model.parameters()` order; `trainable_only` keeps only those that require a gradient."""
    inside = {id(p) for p in backbone.parameters()}
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return {"heads": [p for p in params if id(p) not in inside], "backbone": [p for p in params if id(p) in inside]}


def heads_and_backbone_rates(optim: RateSettings) -> dict[str, float]:
    """{"heads": optim.lr, "backbone": optim.backbone_lr}: the rates of `heads_and_backbone`'s groups."""
    return {"heads": optim.lr, "backbone": optim.backbone_lr}


def make_optimizer(named_param_groups: Mapping[str, Iterable[nn.Parameter]], rates: Mapping[str, float],
                   weight_decay: float, algorithm: str = "adam", momentum: Optional[float] = None
                   ) -> torch.optim.Optimizer:
    """`algorithm` (adam | adamw | sgd, sgd with `momentum`) over one param group per name of
    `named_param_groups`, in its order: {"name": name, "params": [...], "lr": rates[name]}."""
    if set(rates) != set(named_param_groups):
        raise ValueError(f"rates {sorted(rates)} do not name the parameter groups {sorted(named_param_groups)}")
    groups = [{"name": name, "params": list(params), "lr": rates[name]} for name, params in named_param_groups.items()]
    if algorithm == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    if algorithm == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if algorithm == "sgd":
        if momentum is None:
            raise ValueError("sgd needs a momentum")
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, optim: ScheduleSettings, total_steps: int,
                   milestones: Optional[MilestoneSettings] = None) -> dict[str, Any]:
    """Lightning's scheduler config {"scheduler", "interval"} of `optim.schedule` (module docstring);
    `milestones` turns the step schedule into `warmup_multistep` per optimizer step (boxinst)."""
    LambdaLR = torch.optim.lr_scheduler.LambdaLR
    if optim.schedule == "cosine":
        factor = functools.partial(warmup_cosine, warmup_steps=optim.warmup_steps,
                                   total_steps=_total_steps(total_steps))
        return {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}
    if optim.schedule != "step":
        raise ValueError(f"optim.schedule must be step or cosine, got {optim.schedule!r}")
    if milestones is not None:
        factor = functools.partial(warmup_multistep, milestones=sorted(milestones.milestones), gamma=optim.gamma,
                                   warmup_steps=milestones.warmup_steps, warmup_factor=milestones.warmup_factor)
        return {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}
    return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, optim.step_size, optim.gamma),
            "interval": "epoch"}


def build_optimizer(named_param_groups: Mapping[str, Iterable[nn.Parameter]], rates: Mapping[str, float],
                    optim: ScheduleSettings, total_steps: int, algorithm: str = "adam",
                    momentum: Optional[float] = None, milestones: Optional[MilestoneSettings] = None
                    ) -> dict[str, Any]:
    """{"optimizer": `make_optimizer(...)`, "lr_scheduler": `make_scheduler(...)`}: what a
    LightningModule's `configure_optimizers` returns (a list of these for several optimizers)."""
    optimizer = make_optimizer(named_param_groups, rates, optim.weight_decay, algorithm, momentum)
    return {"optimizer": optimizer, "lr_scheduler": make_scheduler(optimizer, optim, total_steps, milestones)}


def _total_steps(total_steps: int) -> int:
    if total_steps < 1:
        raise ValueError("optim.schedule=cosine decays over trainer.max_steps; it must be >= 1")
    return int(total_steps)


__all__ = ["build_optimizer", "make_optimizer", "make_scheduler", "heads_and_backbone", "heads_and_backbone_rates",
           "schedule_factor", "warmup_cosine", "warmup_multistep", "ALGORITHMS"]
