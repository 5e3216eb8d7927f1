"""Gradient accumulation: one optimizer step over ``trainer.accum_steps`` micro-batches.

``data.batch_size`` stays the global batch of one optimizer step (what the recipe's lr
and schedule are written for); each rank's share of it is cut into ``accum_steps``
micro-batches that go forward and backward one after another, so only a micro-batch's
activations are ever in memory. Each micro-batch's loss is weighted by its share of the
batch (1/N for equal parts), so the accumulated gradient is the gradient of the mean loss
over the whole batch, as with one large batch; the optimizer, lr schedule, condensation
schedule, group lasso and EMA all count optimizer steps and see no difference. (BatchNorm
computes its batch statistics per micro-batch, as in every accumulating trainer.)

Under DDP the non-final micro-batches run under ``no_sync``: gradients accumulate
locally and are all-reduced once, with the last backward. Under fp16 AMP every
micro-batch's loss is scaled by the same GradScaler scale; the trainer unscales once
before clipping and stepping. A batch is always a whole optimizer step, so checkpoints
(written between steps) never hold a half-accumulated gradient and a resume restarts the
accumulation from the next step's first micro-batch.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError


def check_accum(batch_size: int, world_size: int, accum_steps: int) -> None:
    """ConfigError unless every rank's share of the batch cuts into equal micro-batches."""
    per_rank = batch_size // world_size
    if per_rank % accum_steps:
        raise ConfigError(
            f"data.batch_size={batch_size} on {world_size} ranks gives {per_rank} images per rank, which "
            f"trainer.accum_steps={accum_steps} does not divide into equal micro-batches. Use a data.batch_size "
            f"that is a multiple of {world_size * accum_steps}."
        )


def micro_batches(images: torch.Tensor, target: torch.Tensor, accum_steps: int):
    """``accum_steps`` consecutive slices of the batch (equal when the size divides)."""
    return list(zip(images.tensor_split(accum_steps), target.tensor_split(accum_steps)))


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def grad_sync(model: nn.Module, last: bool):
    """DDP's ``no_sync`` on all micro-batches but the last; nothing without DDP."""
    ddp = _ddp(model)
    return nullcontext() if ddp is None or last else ddp.no_sync()


def accumulate_backward(
    train_model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    accum_steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward every micro-batch; returns the batch's loss (detached, 0-dim).

    ``loss_fn(images, target)`` is the mean loss of one micro-batch (data to device,
    forward, criterion). With a ``scaler`` a non-finite micro-batch loss poisons its
    gradients, so the scaler skips the step as it would for a non-finite gradient.
    """
    total = images.shape[0]
    parts = micro_batches(images, target, accum_steps)
    losses = []
    for k, (x, y) in enumerate(parts):
        with grad_sync(train_model, last=k == len(parts) - 1):
            loss = loss_fn(x, y)
            if len(parts) > 1:
                loss = loss * (x.shape[0] / total)
            if scaler is not None:
                poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
                scaler.scale(loss * poison).backward()
            else:
                loss.backward()
        losses.append(loss.detach())
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()
