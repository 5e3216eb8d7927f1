"""Trainer callbacks that inject faults, for the reliability tests (test-only code).

In-process tests pass instances to ``train(..., callbacks=[...])``; subprocess tests
load them into the real command through the ``callbacks`` config key, with tests/ on
PYTHONPATH (``helpers.cli`` puts it there)::

    cdnv2-train '+callbacks.kill={_target_:fault_injection.KillAtStep,step:5}'
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from cdnv2.engine import Callback


class Crash(Exception):
    """Stands for a process dying in in-process tests: nothing after it runs."""


class KillAtStep(Callback):
    """SIGKILL this process after optimizer step ``step`` (only on ``rank`` if given).

    With ``once=<file>`` it dies only if the file does not exist yet (and creates it),
    so a restarted job survives.
    """

    def __init__(self, step: int, rank: Optional[int] = None, once: Optional[str] = None):
        self.step, self.rank, self.once = step, rank, once

    def on_step_end(self, trainer) -> None:
        if trainer.step != self.step or (self.rank is not None and trainer.dist.rank != self.rank):
            return
        if self.once:
            if Path(self.once).exists():
                return
            Path(self.once).touch()
        self.die()

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class CrashAtStep(KillAtStep):
    """In-process stand-in for :class:`KillAtStep`: raise :class:`Crash` instead of dying."""

    def die(self) -> None:
        raise Crash(f"crash after step {self.step}")


class SignalAtStep(Callback):
    """Send ``signum`` to this process after step ``step`` (as a scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_end(self, trainer) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), self.signum)


class SlowSteps(Callback):
    """Sleep after every step, so a test can act while training is under way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer) -> None:
        time.sleep(self.seconds)


class NanLossAtStep(Callback):
    """Make the training loss non-finite at step ``step`` (1-based), batch-norm statistics intact.

    A forward hook multiplies the model's training-mode output by NaN; evaluation
    (eval mode) is untouched.
    """

    def __init__(self, step: int):
        self.step = step

    def on_fit_start(self, trainer) -> None:
        def poison(module, inputs, output):
            if module.training and trainer.step + 1 == self.step:
                return output * float("nan")
            return None

        trainer.model.register_forward_hook(poison)


class KillDuringSave(Callback):
    """SIGKILL this process half-way through its ``nth`` write of checkpoint ``name``.

    Wraps ``torch.save`` in this process: once the checkpoint's temporary file is written,
    it is cut to half its size and the process is killed before the writer can fsync and
    rename it, as a power cut in the middle of the write would.
    """

    def __init__(self, name: str = "last.pt", nth: int = 1):
        self.name, self.nth, self.writes = name, nth, 0

    def on_fit_start(self, trainer) -> None:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            target = Path(getattr(f, "name", f))
            if target.name != self.name and self.name in target.name:  # its temporary file
                self.writes += 1
                if self.writes == self.nth:
                    if hasattr(f, "flush"):
                        f.flush()
                    os.truncate(target, max(1, target.stat().st_size // 2))
                    os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save


class FailWrite(Callback):
    """Make the write of checkpoint ``file`` fail with ``OSError(ENOSPC)`` (a full disk)
    once the trainer has counted epoch ``epoch``; every other write goes through.

    Wraps ``torch.save`` for the rest of the run; :meth:`undo` (or the run's end) puts it back.
    """

    def __init__(self, file: str = "best.pt", epoch: int = 1):
        self.file, self.epoch = file, epoch
        self._real = None

    def on_fit_start(self, trainer) -> None:
        real = self._real = torch.save

        def save(obj, f, *args, **kwargs):
            target = Path(getattr(f, "name", f)).name
            if trainer.epoch == self.epoch and target != self.file and self.file in target:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(obj, f, *args, **kwargs)

        torch.save = save

    def on_fit_end(self, trainer, report) -> None:
        self.undo()

    def undo(self) -> None:
        if self._real is not None:
            torch.save, self._real = self._real, None


class KillAfterWrite(Callback):
    """SIGKILL this process right after checkpoint ``file`` of epoch ``epoch`` is in place
    (before the trainer writes anything else)."""

    def __init__(self, file: str = "best.pt", epoch: int = 1):
        self.file, self.epoch = file, epoch

    def on_fit_start(self, trainer) -> None:
        from cdnv2 import atomic_files  # every checkpoint write goes through this module's atomic_save

        real = atomic_files.atomic_save

        def atomic_save(obj, path, *args, **kwargs):
            real(obj, path, *args, **kwargs)
            if Path(path).name == self.file and trainer.epoch == self.epoch:
                self.die()

        atomic_files.atomic_save = atomic_save

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
