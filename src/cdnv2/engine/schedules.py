"""Learning-rate schedules: a pure function of the optimizer step.

Every schedule starts with the same linear warmup (``sched.warmup_epochs``, from
``warmup_start_factor`` x peak to the peak) and then follows its decay over the
remaining steps. Steps are optimizer steps, so gradient accumulation changes nothing.

==========  ============================================================================
cosine      half a cosine from the peak down to ``min_lr`` (the papers' schedule)
step        the peak times ``decay_rate`` at each of ``milestones`` (fractions of the steps
            after the warmup), never below ``min_lr`` (CIFAR's [0.5, 0.75] x 0.1)
linear      a straight line from the peak down to ``min_lr``
constant    the peak
==========  ============================================================================
"""
from __future__ import annotations

import bisect
import math

from .config import SchedConfig


def _cosine(progress: float, peak: float, cfg: SchedConfig) -> float:
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float, peak: float, cfg: SchedConfig) -> float:
    return peak + (cfg.min_lr - peak) * progress


def _step(progress: float, peak: float, cfg: SchedConfig) -> float:
    passed = bisect.bisect_right(sorted(cfg.milestones), progress)
    return max(cfg.min_lr, peak * cfg.decay_rate ** passed)


def _constant(progress: float, peak: float, cfg: SchedConfig) -> float:
    return peak


DECAYS = {"cosine": _cosine, "step": _step, "linear": _linear, "constant": _constant}


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, cfg: SchedConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the decay."""
    if cfg.name not in DECAYS:
        raise ValueError(f"sched.name={cfg.name!r} is not supported; use one of {', '.join(DECAYS)}")
    if step < warmup_steps:
        start = peak_lr * cfg.warmup_start_factor
        return start + (peak_lr - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return DECAYS[cfg.name](progress, peak_lr, cfg)
