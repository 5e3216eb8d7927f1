"""Trainer callbacks: code that runs at fixed points of the loop without editing it.

Subclass :class:`Callback`, override the hooks you need, and pass instances to
``Trainer(cfg, run_dir, callbacks=[...])`` / ``train(..., callbacks=[...])``.
``cdnv2-train`` builds them from the ``callbacks`` config key (import targets, as in
lightning-hydra-template)::

    cdnv2-train '+callbacks.sleep={_target_:mypkg.SlowSteps,seconds:0.5}'

Every hook receives the trainer; read its state (``step``, ``epoch``, ``model``,
``dist``, ``last_checkpoint``, ...) rather than changing it. The tests use callbacks to
inject faults (kills, non-finite losses, slow steps) into real runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step of :meth:`Trainer.fit` (after any resume)."""

    def on_step_end(self, trainer: "Trainer") -> None:
        """After optimizer step ``trainer.step`` and its condensation, before periodic saves."""

    def on_epoch_end(self, trainer: "Trainer") -> None:
        """After an epoch's evaluation and checkpoint."""

    def on_fit_end(self, trainer: "Trainer", report: dict) -> None:
        """After the final evaluation, conversion and report."""

