"""Mask-safe exponential moving average of a model's weights."""
from __future__ import annotations

import copy

import torch
from torch import nn

_AVERAGED_BUFFERS = ("running_mean", "running_var")


class ModelEMA:
    """EMA of parameters and BN statistics; every other buffer is copied, never averaged.

    Masks, condensation stages and compact index buffers are structure, not weights:
    averaging them would make masks fractional. They are copied from the live model on
    every update, so the EMA model always has exactly the live model's connectivity.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # timm-style warmup: decay_t = min(decay, (1 + t) / (10 + t)), so a short run's
        # EMA is not dominated by the random initial weights.
        self.warmup = warmup
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _averaged(self, model: nn.Module) -> set[str]:
        names = {n for n, _ in model.named_parameters()}
        names |= {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in _AVERAGED_BUFFERS}
        return names

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        averaged = self._averaged(model)
        live = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = live[name].detach()
            if name in averaged and ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    @torch.no_grad()
    def sync_structure(self, model: nn.Module) -> None:
        """Copy masks, stages and other structural buffers now (after a condensation step)."""
        averaged = self._averaged(model)
        live = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            if name not in averaged:
                ema_value.copy_(live[name])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
