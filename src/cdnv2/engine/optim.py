"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig, SchedConfig
from .schedules import lr_at  # noqa: F401  (the schedules live in engine/schedules.py)


def resolve_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The recipe's lr scaled linearly with the global batch, unless ``lr`` is given."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * batch_size / cfg.ref_batch_size


def param_groups(model: nn.Module, weight_decay: float, head_lr_scale: float = 1.0,
                 split_head: bool = False) -> list[dict]:
    """Decay conv and linear weights only: BN parameters and biases are 1-d.

    ``split_head``: the classifier (``model.classifier_name``) gets groups of its own,
    tagged ``head`` with ``lr_scale``, so fine-tuning can run it at a higher lr or alone
    (freezing). Off, the layout is the two groups older checkpoints were saved with.
    """
    head_name = getattr(model, "classifier_name", None) if split_head else None
    head = set(map(id, model.get_submodule(head_name).parameters())) if head_name else set()
    groups = {(h, d): [] for h in (False, True) for d in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in head, p.ndim > 1)].append(p)
    out = []
    for (is_head, decay), params in groups.items():
        if params or not is_head:  # the two body groups always exist (stable group layout)
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                        "head": is_head, "lr_scale": head_lr_scale if is_head else 1.0})
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, *, split_head: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW with the fused kernel: one kernel per step, and it can skip a
    step on the device.

    The fused kernels read ``found_inf`` (a 0-dim tensor) on the device and leave the
    parameters and their state untouched when it is nonzero, which is how a non-finite step
    is skipped without the host waiting for the device (:func:`step_unless`). AdamW's
    decay is decoupled (torch's AdamW) and, as with SGD, applies to conv/linear weights
    only. The head has groups of its own with ``split_head`` or a ``head_lr_scale`` != 1.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.head_lr_scale, split_head or cfg.head_lr_scale != 1.0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    if cfg.name != "sgd":
        raise ValueError(f"optim.name={cfg.name!r} is not supported; use 'sgd' or 'adamw'")
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        fused=True,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved state but keep the fused kernel (older checkpoints saved ``fused=False``)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter a zero momentum buffer before its first update.

    Fused SGD allocates missing buffers uninitialised on its first step, so a first step
    skipped on the device would leave garbage in them. With zero dampening (ours) an update
    from a zero buffer equals torch's first update (buffer = gradient) bit for bit.
    """
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:  # AdamW: its state is made zeroed on the host
            continue
        if group["dampening"] != 0:
            raise ValueError("prime_momentum needs dampening=0")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()``, a no-op on the device where ``found_inf`` (0-dim float) is nonzero.

    The protocol torch's GradScaler uses with fused optimizers: no host synchronisation.
    """
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def set_lr(optimizer: torch.optim.Optimizer, lr: float, *, freeze_backbone: bool = False) -> None:
    """Set every group's lr (times its ``lr_scale``); ``freeze_backbone``: only the head moves."""
    for group in optimizer.param_groups:
        frozen = freeze_backbone and not group.get("head", False)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
