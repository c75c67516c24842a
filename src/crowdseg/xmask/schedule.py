"""XMask's three-phase schedule as pure functions (METHODS.md A2.6).

Phase 1 [0, phase1_end): encoder + fuse + decoder, P2R; the semi-supervised branch starts after
`semi_warmup` units with weight w = clip((local - warmup) * ramp_rate, 0, ramp_max).
Phase 2 [phase1_end, phase2_end): encoder frozen; MaskHead + fuse with the discriminative loss;
same warm-up and ramp, counted from the phase start. (The published code also lists the decoder,
but no phase-2 loss reaches it, so it never moves there; here an Adam group with a zero gradient
and a non-zero rate would still move by its momentum, so it is left out. Add it with the soft
point-mask term, which does train it.)
Phase 3 [phase2_end, ...): fuse + decoder with the mask-constraint loss; semi branch from the start,
w = clip(local * ramp_rate + phase3_ramp_start, phase3_ramp_start, ramp_max).
The total is (sup + w * semi) / (1 + w).

A unit is an epoch or an optimizer step (`unit`). Phases switch trainable parameters by learning
rate only: every group stays in the optimizer with requires_grad=True and a group that a phase
freezes gets lr 0 (Adam then leaves it unchanged, weight decay included), so the set of parameters
DDP reduces never changes. The optimizer state is cleared when a new phase starts (the published
code builds a new optimizer per phase) and is saved with every checkpoint, so a run resumed
inside a phase continues with that phase's state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from crowdseg.models.xmask import PARAMETER_GROUPS

UNITS = ("epoch", "step")
DEFAULT_PHASE_GROUPS: dict[int, tuple[str, ...]] = {1: ("encoder", "fuse", "decoder"),
                                                     2: ("fuse", "mask_head"),
                                                     3: ("fuse", "decoder")}


@dataclass(frozen=True)
class PhaseSchedule:
    unit: str = "epoch"
    phase1_end: int = 1500
    phase2_end: int = 2000
    semi_warmup: int = 50
    ramp_rate: float = 0.01
    ramp_max: float = 2.0
    phase3_ramp_start: float = 0.1
    groups: Mapping[int, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_PHASE_GROUPS))

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if not 0 <= self.phase1_end <= self.phase2_end:
            raise ValueError(f"need 0 <= phase1_end <= phase2_end, got {self.phase1_end}, {self.phase2_end}")
        for phase, names in self.groups.items():
            unknown = set(names) - set(PARAMETER_GROUPS)
            if unknown:
                raise ValueError(f"phase {phase}: unknown parameter groups {sorted(unknown)} (known: {PARAMETER_GROUPS})")

    def position(self, epoch: int, step: int) -> tuple[int, int]:
        """(phase 1..3, units since the phase started) at a trainer epoch / global step."""
        t = epoch if self.unit == "epoch" else step
        if t < self.phase1_end:
            return 1, t
        if t < self.phase2_end:
            return 2, t - self.phase1_end
        return 3, t - self.phase2_end

    def semi_weight(self, phase: int, local: int) -> float:
        """Weight w of the unlabeled branch; 0 switches it off."""
        if phase == 3:
            return min(max(local * self.ramp_rate + self.phase3_ramp_start, self.phase3_ramp_start), self.ramp_max)
        return min(max((local - self.semi_warmup) * self.ramp_rate, 0.0), self.ramp_max)

    def trainable(self, phase: int) -> tuple[str, ...]:
        return tuple(self.groups[phase])


def group_learning_rates(schedule: PhaseSchedule, phase: int, lrs: Mapping[int, Mapping[str, float]],
                         decay: float = 1.0) -> dict[str, float]:
    """Learning rate of every parameter group in `phase`: lrs[phase][group] * decay for the
    phase's trainable groups, 0 for the others (`decay`: the shared schedule's factor,
    crowdseg.optim.schedule_factor)."""
    active = set(schedule.trainable(phase))
    return {g: (float(lrs[phase][g]) * decay if g in active else 0.0) for g in PARAMETER_GROUPS}


def default_phase_lrs(lr: float, backbone_lr: float, phase2_lr: Optional[float],
                      phase3_lr: Optional[float]) -> dict[int, dict[str, float]]:
    """XMask's rates per phase and group: phase 1 `lr` (encoder `backbone_lr`), phase 2 `phase2_lr`
    (5e-6 published), phase 3 `phase3_lr`; a phase rate of None is `lr` (optim.lr)."""
    phase2 = lr if phase2_lr is None else phase2_lr
    phase3 = lr if phase3_lr is None else phase3_lr
    return {1: {"encoder": backbone_lr, "fuse": lr, "decoder": lr, "mask_head": lr},
            2: {g: phase2 for g in PARAMETER_GROUPS},
            3: {g: phase3 for g in PARAMETER_GROUPS}}
