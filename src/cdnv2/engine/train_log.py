"""What the training loop tells the user as it goes: the run's start line, the train metrics
of each log window (``log_every`` steps) and the loss on the progress line.

Per-epoch rows are :mod:`cdnv2.engine.epoch_log`'s, the end of the run
:mod:`cdnv2.engine.finalize`'s.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..compact import Structure
from ..condense import layer_kind
from .health import HealthWindow
from .logger import log

if TYPE_CHECKING:
    from .trainer import Trainer


def log_run_start(trainer: Trainer) -> None:
    """One line with what the run will do, so a wrong dataset or lr shows at once (rank 0)."""
    t = trainer
    if not t.is_main:
        return
    fires: dict[str, set[int]] = {}
    for name, layer in t.condenser.layers:
        fires.setdefault(layer_kind(layer), set()).update(t.condenser.fire_at[name])
    schedule = "; ".join(f"{kind} at steps {sorted(steps)}" for kind, steps in sorted(fires.items()))
    log.info(
        "run %s: data=%s with %d train / %d val images, %d classes; lr %.4g; %d steps "
        "(%d epochs x %d); condensation: %s",
        t.run_dir, t.cfg.data.name, len(t.data.train_loader.dataset),
        len(t.data.val_loader.dataset), t.data.num_classes, t.peak_lr, t.total_steps,
        t.cfg.trainer.epochs, t.steps_per_epoch, schedule or "none (no condensing layers)",
    )


def train_metrics(trainer: Trainer, window: HealthWindow, images: int, since: float) -> dict[str, float]:
    """The scalars of one log window: lr, images per second since ``since``, the mean loss of
    its good steps and, while it is on, the group-lasso penalty."""
    t = trainer
    metrics = {
        "train/lr": t.optimizer.param_groups[0]["lr"],
        "train/images_per_second": images / max(time.perf_counter() - since, 1e-9),
    }
    if window.loss is not None:
        metrics["train/loss"] = window.loss
    if t.condenser.lasso_active(t.step) and t.structure is Structure.MASKED:
        with torch.no_grad():
            metrics["train/lasso"] = float(t.condenser.lasso_penalty())
    return metrics


def progress_loss(window: HealthWindow) -> dict[str, str]:
    """What the progress line shows of a log window: its mean loss, ``skip`` only when every
    step in it was skipped, nothing when a checkpoint or a condensation step already looked."""
    if window.loss is not None:
        return {"loss": f"{window.loss:.3f}"}
    return {"loss": "skip"} if window.bad_steps else {}
