"""When to prune: the condensation schedule, as a pure function of integer steps.

A layer with condense factor C takes C-1 steps. By default step s (1-based) fires
once ``s / (C-1) * end_fraction`` of training has passed (SPEC 5: s / (2(C-1)) with
``end_fraction = 0.5``). Step s fires at the first completed optimizer step
``t >= ceil(f_s * T)``; :class:`Condenser.step` is called with the number of
completed steps ``t`` (0 before training, ``T`` at the end), applies what is due
and is idempotent, so it is correct for runs shorter than the number of stages,
for odd step counts and after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ScheduleError
from ..layers import CondensingConv1x1, LearnedLinear, SparseFeatureReactivation


LASSO_LAYERS = ("lgc", "sfr")  # layer kinds the group lasso can cover


@dataclass
class CondenseConfig:
    """Condensation schedule and group-lasso settings (the ``condense`` config group)."""

    end_fraction: float = 0.5  # all pruning done after this fraction of training
    lgc_fractions: Optional[list[float]] = None  # explicit LGC step fractions (C-1 of them)
    sfr_fractions: Optional[list[float]] = None  # explicit SFR step fractions (C-1 of them)
    lasso_lambda: float = 0.0  # group-lasso weight; 0 = off (V2 ImageNet recipe)
    lasso_layers: list[str] = field(default_factory=lambda: ["lgc"])  # lgc and/or sfr
    restart: bool = False  # with init=PATH: reset the file's masks to dense, keep its weights
    bn_recal_batches: int = 8  # train batches that re-estimate BN statistics after each step; 0: off
    fade_fraction: float = 0.0  # fraction of training over which the weights a step drops fade to 0 first; 0: off




def layer_kind(m: nn.Module) -> str:
    if isinstance(m, SparseFeatureReactivation):
        return "sfr"
    if isinstance(m, LearnedLinear):
        return "classifier"
    return "lgc"


def condensing_layers(model: nn.Module) -> list[tuple[str, CondensingConv1x1]]:
    """Every masked LGC/SFR layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CondensingConv1x1)]


def condense_fully(model: nn.Module) -> nn.Module:
    """Run every remaining condensation step of every LGC/SFR layer now (no schedule, no
    training in between); returns ``model`` (changed in place), ready for conversion."""
    for _, m in condensing_layers(model):
        while not m.fully_condensed:
            m.condense_step()
    return model


def step_fractions(num_steps: int, end_fraction: float, explicit: Optional[list[float]] = None) -> list[Fraction]:
    """Fractions of training after which each of ``num_steps`` condensation steps fires."""
    if explicit is not None:
        if len(explicit) != num_steps:
            raise ScheduleError(
                f"{len(explicit)} condensation fractions given for a layer with "
                f"{num_steps} steps (condense factor {num_steps + 1}); give exactly {num_steps}"
            )
        fractions = [Fraction(str(f)) for f in explicit]
    else:
        end = Fraction(str(end_fraction))
        fractions = [end * s / num_steps for s in range(1, num_steps + 1)]
    if not fractions_ok(fractions):
        raise ScheduleError(
            f"condensation fractions must increase strictly within (0, 1); got {[float(f) for f in fractions]}"
        )
    return fractions


def fractions_ok(fractions: Sequence) -> bool:
    """The one rule for a layer's condensation fractions (explicit, or spread evenly up to
    ``end_fraction``): each in (0, 1), strictly increasing. Pruning at the very end (1) would
    leave the pruned model untrained, and two steps at one time are one bigger step."""
    return all(0 < f < 1 for f in fractions) and all(a < b for a, b in zip(fractions, fractions[1:]))


def fire_steps(num_steps: int, total_steps: int, end_fraction: float = 0.5,
               explicit: Optional[list[float]] = None) -> list[int]:
    """Completed-step counts at which steps 1..num_steps fire (each in [1, total_steps])."""
    if total_steps < 1:
        raise ScheduleError(f"total_steps must be >= 1, got {total_steps}")
    return [max(1, math.ceil(f * total_steps)) for f in step_fractions(num_steps, end_fraction, explicit)]


@dataclass
class CondenseEvent:
    """What one call of :meth:`Condenser.step` changed, for logs."""

    step: int
    fired: list[tuple[str, int]]  # (layer name, its new stage)
    density: dict[str, float]  # mean mask density per layer kind after the change
    stage: dict[str, int]  # smallest stage per layer kind


class Condenser:
    """Applies the condensation schedule to a model from the trainer, never from forward().

    ``from_current_stage``: the layers' present stages are the run's starting point (a
    run initialised from pretrained, partly condensed weights). The remaining steps of
    a layer are spread over ``(0, end_fraction]`` of this run; explicit fractions keep
    the times of their remaining entries. Default: every layer starts at stage 0.
    """

    def __init__(self, model: nn.Module, total_steps: int, cfg: CondenseConfig | None = None, *,
                 from_current_stage: bool = False):
        self.cfg = cfg or CondenseConfig()
        self.total_steps = total_steps
        self.layers = condensing_layers(model)
        self.start = {name: int(m.stage) if from_current_stage else 0 for name, m in self.layers}
        self.fire_at: dict[str, list[int]] = {}
        for name, m in self.layers:
            kind = layer_kind(m)
            explicit = {"lgc": self.cfg.lgc_fractions, "sfr": self.cfg.sfr_fractions}.get(kind)
            done = self.start[name]
            if explicit is not None:
                self.fire_at[name] = fire_steps(m.num_steps, total_steps, self.cfg.end_fraction, explicit)[done:]
            else:
                self.fire_at[name] = fire_steps(m.num_steps - done, total_steps, self.cfg.end_fraction)
        self.final_step = max((s[-1] for s in self.fire_at.values() if s), default=0)
        self._fire_steps = {s for steps in self.fire_at.values() for s in steps}
        self.fade_steps = math.ceil(Fraction(str(self.cfg.fade_fraction)) * total_steps)
        self._fade_steps = {
            c for steps in self.fire_at.values()
            for prev, s in zip([0] + steps, steps) for c in range(max(prev, s - self.fade_steps, 1), s)
        }

    def due(self, completed: int) -> bool:
        """Whether a condensation step is scheduled after ``completed`` steps.

        Host integers only: :meth:`step` reads every layer's stage from the device, which
        the trainer must not do on every step.
        """
        return completed in self._fire_steps

    def target_stage(self, name: str, completed: int) -> int:
        return self.start[name] + sum(1 for t in self.fire_at[name] if completed >= t)

    def verify(self, completed: int) -> None:
        """Raise :class:`ScheduleError` unless every layer is at its stage for ``completed`` steps."""
        for name, m in self.layers:
            want, have = self.target_stage(name, completed), int(m.stage)
            if want != have:
                raise ScheduleError(
                    f"layer {name} is at condensation stage {have} but the schedule puts it at "
                    f"stage {want} after {completed} of {self.total_steps} steps; the checkpoint "
                    "was written with another schedule (epochs, steps per epoch or condense settings "
                    "differ) - resume with the settings it was trained with"
                )

    @torch.no_grad()
    def step(self, completed: int) -> CondenseEvent | None:
        """Apply every condensation step due after ``completed`` optimizer steps."""
        fired = []
        for name, m in self.layers:
            want = self.target_stage(name, completed)
            if int(m.stage) > want:
                raise ScheduleError(
                    f"layer {name} is at stage {int(m.stage)}, ahead of the schedule ({want}) "
                    f"at step {completed}"
                )
            while int(m.stage) < want:
                m.condense_step()
                fired.append((name, int(m.stage)))
            if fired and fired[-1][0] == name and dist.is_available() and dist.is_initialized():
                dist.broadcast(m.mask, 0)  # float ties could differ across ranks; rank 0 decides
        if not fired:
            return None
        return CondenseEvent(completed, fired, self.density(), self.stages())

    def fading(self, completed: int) -> bool:
        """Whether some layer's next step is at most ``condense.fade_fraction`` of training
        away after ``completed`` steps (host integers only, like :meth:`due`)."""
        return completed in self._fade_steps

    @torch.no_grad()
    def fade(self, completed: int) -> None:
        """The gentle step: call after :meth:`step` with the same count. For each layer whose
        next step fires ``r <= fade_steps`` steps from now, scale the weights that step would
        drop by ``(r - 1) / r``: a linear ramp that reaches zero one step before the mask
        removes them, so the network adapts on the way. A function of the step count and the
        weights alone: a resumed run fades exactly as an uninterrupted one."""
        for name, m in self.layers:
            upcoming = [t for t in self.fire_at[name] if t > completed]
            if upcoming and upcoming[0] - completed <= self.fade_steps:
                remaining = upcoming[0] - completed
                m.fade_step((remaining - 1) / remaining)

    def density(self) -> dict[str, float]:
        return _per_kind(self.layers, lambda m: m.density, lambda v: sum(v) / len(v))

    def stages(self) -> dict[str, int]:
        return _per_kind(self.layers, lambda m: int(m.stage), min)

    @property
    def done(self) -> bool:
        return all(m.fully_condensed for _, m in self.layers)

    def lasso_active(self, completed: int) -> bool:
        return self.cfg.lasso_lambda > 0 and completed < self.final_step

    def lasso_penalty(self) -> torch.Tensor:
        """lambda * group-lasso summed over the configured layer kinds."""
        terms = [m.lasso_penalty() for _, m in self.layers if layer_kind(m) in self.cfg.lasso_layers]
        return self.cfg.lasso_lambda * torch.stack(terms).sum()


def _per_kind(layers, value, reduce) -> dict:
    groups: dict[str, list] = {}
    for _, m in layers:
        groups.setdefault(layer_kind(m), []).append(value(m))
    return {k: reduce(v) for k, v in groups.items()}
