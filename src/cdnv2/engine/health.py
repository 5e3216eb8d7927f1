"""Per-step loss health kept on the device, looked at by the host only now and then.

Reading a loss (``float(loss)``, ``bool(torch.isfinite(loss))``) makes the host wait for
the device to finish the step, which on a GPU serialises kernel launches with compute.
:class:`StepHealth` keeps each step's non-finite flag and loss as device tensors; the
trainer gates the optimizer and EMA with the flag (on the device) and calls
:meth:`StepHealth.collect` at log points and before every checkpoint: one host sync for
all the steps since the previous look. :func:`apply_nan_policy` decides what a skipped
step means (``trainer.nan_policy``, ``trainer.max_bad_steps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import NonFiniteLossError
from .distributed import DistInfo
from .logger import log


@dataclass
class HealthWindow:
    """What the steps since the previous look did."""

    bad_steps: list[int] = field(default_factory=list)  # 1-based steps with a non-finite loss
    loss: float | None = None  # mean loss of the good steps (this rank's); None: none
    good: int = 0  # number of good steps


class StepHealth:
    def __init__(self, dist_info: DistInfo):
        self.dist = dist_info
        self._steps: list[int] = []
        self._flags: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []

    def record(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Flag of optimizer step ``step`` (1-based): a 0-dim float, 1.0 when any rank's loss is
        not finite. Stays on the device; in a distributed run one small all-reduce that the
        host does not wait for, so every rank skips the same steps."""
        loss = loss.detach()
        bad = (~torch.isfinite(loss)).float()
        if self.dist.enabled:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._steps.append(step)
        self._flags.append(bad)
        self._losses.append(loss.float())
        return bad

    def collect(self) -> HealthWindow:
        """Look at the recorded steps (one device-to-host copy) and forget them."""
        if not self._steps:
            return HealthWindow()
        flags, losses = torch.stack(self._flags), torch.stack(self._losses)
        good = flags == 0
        count = good.sum()
        mean = torch.where(good, losses, 0.0).sum() / count.clamp(min=1)  # NaN-free: bad steps masked
        host = torch.cat([flags, mean[None], count[None].float()]).cpu().tolist()
        steps = self._steps
        self._steps, self._flags, self._losses = [], [], []
        n = len(steps)
        good_n = int(host[n + 1])
        return HealthWindow(
            bad_steps=[s for s, f in zip(steps, host[:n]) if f],
            loss=host[n] if good_n else None,
            good=good_n,
        )


def apply_nan_policy(where: str, bad_steps: int, policy: str, max_bad_steps: int) -> None:
    """One more step with a non-finite loss (``where`` says which; ``bad_steps`` counts it):
    under ``raise``, or past ``max_bad_steps`` skipped ones, stop the run with
    :class:`~cdnv2.errors.NonFiniteLossError`; otherwise warn that it was skipped."""
    if policy == "raise":
        raise NonFiniteLossError(
            where + ". Lower optim.lr or enable optim.grad_clip, then re-run to resume; or set "
            "trainer.nan_policy=skip to skip such steps."
        )
    if bad_steps > max_bad_steps:
        raise NonFiniteLossError(
            where + f"; {bad_steps} steps skipped, more than trainer.max_bad_steps={max_bad_steps}"
        )
    log.warning("%s: step skipped (%d so far)", where, bad_steps)
