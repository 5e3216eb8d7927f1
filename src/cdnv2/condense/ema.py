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

    An update is a few foreach kernels over tensor lists cached per structure (not a
    ``state_dict()`` walk and one kernel per tensor).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # timm-style warmup: decay_t = min(decay, (1 + t) / (10 + t)), so a short run's
        # EMA is not dominated by the random initial weights.
        self.warmup = warmup
        self._updates = 0
        self._gated_updates: torch.Tensor | None = None  # device-side count of gated updates
        self._pairs: _Pairs | None = None
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _averaged(self, model: nn.Module) -> set[str]:
        names = {n for n, _ in model.named_parameters()}
        names |= {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in _AVERAGED_BUFFERS}
        return names

    def _build(self, model: nn.Module) -> _Pairs:
        """Pair the EMA's tensors with the live model's, once per structure (by name)."""
        averaged = self._averaged(model)
        live = model.state_dict()  # detached views: they see every in-place update
        pairs = _Pairs(model)
        for name, ema_value in self.module.state_dict().items():
            value = live[name]
            if name in averaged and ema_value.is_floating_point():
                pairs.ema_avg.append(ema_value)
                pairs.live_avg.append(value)
            else:  # structure (masks, stages, indices) and counters: copied, grouped by dtype
                ema_group, live_group = pairs.copied.setdefault((ema_value.dtype, value.dtype), ([], []))
                ema_group.append(ema_value)
                live_group.append(value)
        return pairs

    def _tensors(self, model: nn.Module) -> _Pairs:
        if self._pairs is None or self._pairs.model is not model:
            self._pairs = self._build(model)
        return self._pairs

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @property
    def updates(self) -> int:
        """Updates applied so far (reading it after gated updates waits for the device)."""
        if self._gated_updates is not None:
            self._updates += int(self._gated_updates.item())
            self._gated_updates = None
        return self._updates

    @updates.setter
    def updates(self, value: int) -> None:
        self._updates, self._gated_updates = int(value), None

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        """One EMA step towards ``model``.

        ``apply`` (optional 0-dim float tensor, 1.0 or 0.0) decides on the device whether this
        update happens, so a training step skipped on the device is skipped here too without
        the host waiting for the device; ``None`` always updates.

        The tensor lists are built once and reused until :meth:`sync_structure` (call it after
        replacing modules of ``model``, e.g. the compact-training swap).
        """
        pairs = self._tensors(model)
        if apply is None:
            decay = self.current_decay()
            self.updates = self.updates + 1
            torch._foreach_lerp_(pairs.ema_avg, pairs.live_avg, 1.0 - decay)
        else:
            self._gated_update(pairs, apply)
        for ema_group, live_group in pairs.copied.values():
            torch._foreach_copy_(ema_group, live_group)

    def _gated_update(self, pairs: _Pairs, apply: torch.Tensor) -> None:
        # weight = (1 - decay_t) * apply, decay_t from the update count, all on the device;
        # ema += weight * (live - ema): with weight 0 the EMA stays bit for bit.
        apply = apply.to(torch.float64)
        if self._gated_updates is None:
            self._gated_updates = torch.zeros((), dtype=torch.float64, device=apply.device)
        if self.warmup:
            t = self._updates + self._gated_updates
            decay = torch.clamp((1 + t) / (10 + t), max=self.decay)
        else:
            decay = torch.full((), self.decay, dtype=torch.float64, device=apply.device)
        weight = ((1.0 - decay) * apply).float()
        diff = torch._foreach_sub(pairs.live_avg, pairs.ema_avg)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(pairs.ema_avg, diff)
        self._gated_updates += apply

    @torch.no_grad()
    def sync_structure(self, model: nn.Module) -> None:
        """Copy masks, stages and other structural buffers now (after a condensation step or a
        module swap), and rebuild the cached tensor lists."""
        self._pairs = self._build(model)
        for ema_group, live_group in self._pairs.copied.values():
            torch._foreach_copy_(ema_group, live_group)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
        self._pairs = None


class _Pairs:
    """The EMA's tensors and the live model's, in matching order."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.ema_avg: list[torch.Tensor] = []
        self.live_avg: list[torch.Tensor] = []
        self.copied: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
