"""SIGINT / SIGTERM the way clusters send them.

``timeout``, SLURM preemption, Kubernetes and a terminal's Ctrl-C signal the whole
process group, data loader workers included. The policy:

- Only the main process acts. Loader workers ignore both signals
  (:func:`quiet_worker`, their ``worker_init_fn``; they start with the signals blocked,
  :func:`blocked`, so there is no window before it runs) and the main process stops
  them when it exits.
- While training steps run, a signal is only recorded (:meth:`StopGuard.deferring`);
  the trainer finishes the step, writes ``last.pt`` and stops. Elsewhere (start-up,
  evaluation, conversion, the other commands) it raises :class:`StopSignal` at once.
- A second signal exits immediately (``os._exit``), touching no checkpoint.

The CLI installs the guard for the whole command (:func:`install`); library callers of
``train()`` get one for the duration of ``fit`` when they call it from the main thread.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM outside training steps.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` blocks do not
    swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class StopGuard:
    """The process's SIGINT/SIGTERM handler and what it has seen."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child before its own set-up: not ours to act on
            return
        if self.received is not None:
            name = signal.Signals(signum).name
            sys.stderr.write(f"second {name}: exiting at once, without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        if not self._deferring:
            raise StopSignal(signum)

    @contextmanager
    def deferring(self) -> Iterator["StopGuard"]:
        """Within: a signal is only recorded; the caller polls :attr:`received`."""
        before, self._deferring = self._deferring, True
        try:
            yield self
        finally:
            self._deferring = before

    @contextmanager
    def abortable(self) -> Iterator[None]:
        """Within (e.g. an evaluation inside training): a signal raises at once."""
        before, self._deferring = self._deferring, False
        try:
            if self.received is not None:
                raise StopSignal(self.received)
            yield
        finally:
            self._deferring = before

    def _install(self) -> None:
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self.handle)

    def _uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


_guard: StopGuard | None = None


def install() -> StopGuard:
    """Make SIGINT/SIGTERM raise :class:`StopSignal` for the rest of the process (CLI)."""
    global _guard
    if _guard is None:
        _guard = StopGuard()
        _guard._install()
    return _guard


@contextmanager
def guard() -> Iterator[StopGuard]:
    """The installed guard, or one installed for this block (main thread only).

    Off the main thread signals cannot be handled; the guard then never fires.
    """
    global _guard
    if _guard is not None:
        yield _guard
        return
    g = StopGuard()
    if threading.current_thread() is not threading.main_thread():
        yield g
        return
    _guard = g
    g._install()
    try:
        yield g
    finally:
        g._uninstall()
        _guard = None


@contextmanager
def blocked(active: bool = True) -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while processes are forked (they inherit
    the mask); a signal that arrives meanwhile is delivered when the block ends."""
    if not active:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def quiet_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of loader workers: leave stop signals to the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
