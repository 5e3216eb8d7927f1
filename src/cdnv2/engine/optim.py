"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, SchedConfig


def resolve_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The recipe's lr scaled linearly with the global batch, unless ``lr`` is given."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * batch_size / cfg.ref_batch_size


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv and linear weights only: BN parameters and biases are 1-d."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name != "sgd":
        raise ValueError(f"optim.name={cfg.name!r} is not supported; use 'sgd'")
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay),
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, cfg: SchedConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if cfg.name != "cosine":
        raise ValueError(f"sched.name={cfg.name!r} is not supported; use 'cosine'")
    if step < warmup_steps:
        start = peak_lr * cfg.warmup_start_factor
        return start + (peak_lr - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return cfg.min_lr + 0.5 * (peak_lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
