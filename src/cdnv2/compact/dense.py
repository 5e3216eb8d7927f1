"""Dense layer, block and feature extractor of the compact inference model.

Three paths with the same math:

- traced (``torch.compile``, ``torch.export``) in eval mode: the static path
  (:mod:`cdnv2.compact.static_run`: one block buffer, folds stored as ``static_*``
  buffers refreshed on ``eval()`` and ``load_state_dict``; no host reads);
- eager under ``torch.no_grad()`` / ``inference_mode()`` in eval mode, without hooks or
  autocast: the fused path (:mod:`cdnv2.compact.fused_run`: one buffer per block, BNs
  folded into the GEMMs, plans kept in side stores, never in the modules);
- otherwise the plain module-by-module path.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CompactLGC, CompactSFR, PreActConv
from .fold import act_kind
from .fused_plan import forget_plan
from .fused_run import is_pool2, run_block
from .static_run import refresh_static, register_static_buffers, run_block_static

# module -> its submodules (without itself, so the entry does not keep the module alive):
# walking ~600 modules per call costs ~2 ms on cdnv2_c; train() / eval() refresh it.
_SUBMODULES: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class _Fused:
    """train()/eval() drop what the fused path derived from this module."""

    def train(self, mode: bool = True):
        forget_plan(self)
        _SUBMODULES.pop(self, None)
        return super().train(mode)


def _static(module: nn.Module) -> bool:
    """Traced in eval mode: the static path (it ignores hooks and autograd)."""
    return torch.compiler.is_compiling() and not module.training


def _fused_ok(module: nn.Module) -> bool:
    """The fused path runs in eval mode without autograd and without hooks to observe."""
    if module.training or torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    mods = _SUBMODULES.get(module)
    if mods is None:
        mods = _SUBMODULES[module] = list(module.modules())[1:]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in mods)


class CompactDenseLayer(_Fused, nn.Module):
    """Inference dense layer: compact LGC -> 3x3 -> [SE] -> [compact SFR]; concat.

    The same math as :class:`~cdnv2.models.DenseLayer` with compact 1x1 layers. Child
    names match the masked layer, so state-dict keys differ only inside LGC/SFR; it
    satisfies :class:`~cdnv2.compact.fold.DenseLayerLike`.

    ``fast_modes`` forces kernel choices of the eager fused path (keys ``"lgc"``:
    ``"dense"`` | ``"grouped"``, ``"sfr"``: ``"dense"`` | ``"grouped"``, ``"conv3"``:
    ``"depthwise"`` | ``"conv"``); a missing key takes the measured default.
    """

    def __init__(self, conv_1: CompactLGC, conv_2: PreActConv, se: nn.Module, sfr: CompactSFR | None, *,
                 fast_modes: dict[str, str] | None = None):
        super().__init__()
        self.conv_1, self.conv_2, self.se, self.sfr = conv_1, conv_2, se, sfr
        self.in_channels = conv_1.in_channels
        self.growth = conv_2.conv.out_channels
        self.fast_modes: dict[str, str] = dict(fast_modes or {})
        self.act_kinds = (act_kind(conv_1.act), act_kind(conv_2.act), act_kind(sfr.act) if sfr is not None else None)
        register_static_buffers(self)
        self.static_ready = not self.training and refresh_static(self)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def train(self, mode: bool = True):
        super().train(mode)
        # eval(): fold the current weights for the static path (BNs are in eval mode now)
        self.static_ready = not mode and refresh_static(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _static(self) and self.static_ready:
            return run_block_static([self], x)
        if _fused_ok(self):
            out = run_block([self], x)
            if out is not None:
                return out
        h = self.se(self.conv_2(self.conv_1(x)))
        if self.sfr is not None:
            x = self.sfr(x, h)
        return torch.cat([x, h], 1)


def _refresh_after_load(layer: CompactDenseLayer, incompatible_keys) -> None:
    layer.static_ready = not layer.training and refresh_static(layer)


def _all_fusable(block: nn.Sequential) -> bool:
    return all(isinstance(layer, CompactDenseLayer) for layer in block)


class CompactDenseBlock(_Fused, nn.Sequential):
    """A dense block of :class:`CompactDenseLayer`; in eval/no-grad it writes every
    layer's output into one preallocated block buffer (no concatenation copies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _static(self) and _all_fusable(self) and all(layer.static_ready for layer in self):
            return run_block_static(list(self), x)
        if _fused_ok(self) and _all_fusable(self):
            out = run_block(list(self), x)
            if out is not None:
                return out
        return super().forward(x)


class CompactFeatures(_Fused, nn.Sequential):
    """A feature extractor holding :class:`CompactDenseBlock` s (e.g. ``model.features``).

    In eval/no-grad, a 2x2 average-pool transition writes its output straight into the
    next block's buffer, and block buffers that only feed a transition or a BN come from
    the reusable workspace. Otherwise it is a plain ``nn.Sequential``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _static(self) or not _fused_ok(self):
            return super().forward(x)
        children = list(self)
        pool, flip = False, 0
        for i, m in enumerate(children):
            nxt = children[i + 1] if i + 1 < len(children) else None
            if is_pool2(m) and isinstance(nxt, CompactDenseBlock) and _all_fusable(nxt):
                pool = True  # fused into the next block's buffer (the branch below)
                continue
            if isinstance(m, CompactDenseBlock) and _all_fusable(m):
                # A buffer that only feeds a transition or a BN may live in the workspace;
                # the blocks alternate between two so a pool can read one and write the other.
                internal = nxt is not None and (is_pool2(nxt) or isinstance(nxt, nn.BatchNorm2d))
                out = run_block(list(m), x, pool=pool, buffer_name=f"block{flip}" if internal else None)
                if out is None:
                    out = m(F.avg_pool2d(x, 2) if pool else x)
                x, pool, flip = out, False, 1 - flip
                continue
            x = m(x)
        return x
