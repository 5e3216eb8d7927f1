"""TrainState: everything a training checkpoint saves and a resume restores.

The :class:`~cdnv2.engine.trainer.Trainer` holds one. It owns the objects whose state
moves (model, optimizer, EMA, gradient scaler), the model's structure and the progress
counters; :meth:`TrainState.state_dict` reads them, plus the process RNG streams, into
the keys :data:`cdnv2.checkpoint.TRAIN_STATE_KEYS` names, and
:meth:`TrainState.load_state_dict` puts such keys back in the same order, so a resumed
run continues bit for bit. The rest of a ``kind="train"`` file describes the run (model
name, classes, config, identity: :data:`cdnv2.checkpoint.TRAIN_RUN_KEYS`); a resume
checks those and restores nothing from them (:mod:`cdnv2.engine.resume`).

Structure changes go through the state too (:meth:`to_compact_training`, and
:meth:`load_state_dict` of a compact-training checkpoint), because they replace the
optimizer: the model and the optimizer that steps it are swapped together.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..compact import Structure, restructure_for_state_dict, to_compact_training
from ..condense import ModelEMA
from .optim import load_optimizer_state


@dataclass
class TrainState:
    """The restorable part of a run. Counters count completed work."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Optional[ModelEMA] = None
    scaler: Optional[torch.amp.GradScaler] = None
    structure: Structure = Structure.MASKED
    step: int = 0  # completed optimizer steps
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # completed batches of the current epoch
    best_top1: float = -1.0  # best evaluation of a fully condensed model so far
    bad_steps: int = 0  # steps skipped for a non-finite loss
    train_seconds: float = 0.0  # time spent in train steps
    last_eval: dict = field(default_factory=dict)  # the newest evaluation ("metrics" in the file)

    def state_dict(self) -> dict:
        """The ``TRAIN_STATE_KEYS`` of a training checkpoint (tensors are live references:
        the caller saves them before the next step changes them)."""
        return {
            "structure": self.structure.value,
            "model_state": self.model.state_dict(),
            "ema_state": self.ema.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_top1": self.best_top1,
            "bad_steps": self.bad_steps,
            "train_seconds": self.train_seconds,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "metrics": dict(self.last_eval),
        }

    def load_state_dict(self, state: dict, new_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        """Restore a checkpoint's state (and the process RNG streams) into this one.

        A checkpoint of another structure first turns the model (and EMA) into that form;
        ``new_optimizer(model)`` then builds the optimizer for the new parameters, whose
        state is loaded next.
        """
        structure = Structure(state["structure"])
        if structure is not self.structure:
            restructure_for_state_dict(self.model, state["model_state"])
            if self.ema is not None:
                restructure_for_state_dict(self.ema.module, state["model_state"])
            self.optimizer = new_optimizer(self.model)
            self.structure = structure
        self.model.load_state_dict(state["model_state"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema_state"] or state["model_state"])
            self.ema.updates = state["ema_updates"]
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_top1, self.bad_steps = state["best_top1"], state["bad_steps"]
        self.train_seconds = state["train_seconds"]
        self.last_eval = dict(state["metrics"] or {})
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_random_state(state["rng"]["python"]))

    def to_compact_training(self) -> None:
        """All masks are final: pruned weights leave the model, the EMA and the optimizer."""
        to_compact_training(self.model, self.optimizer)
        if self.ema is not None:
            to_compact_training(self.ema.module)
            self.ema.sync_structure(self.model)  # new modules: rebuild the EMA's tensor lists
        self.structure = Structure.COMPACT_TRAINING

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and converted: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def _as_random_state(state):
    # weights_only loading turns the inner tuple into a list; random.setstate wants tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)

