"""Plans of the fused inference path: one dense layer's weights, folded once.

A plan holds what :mod:`cdnv2.compact.fused_run` needs to run one
:class:`~cdnv2.compact.CompactDenseLayer` in few passes over memory (exact up to float
rounding):

- the 3x3 unit's BN (``conv_2.norm``) is affine right after the LGC conv: it goes into
  the GEMM weights and a bias (the shuffle only permutes channels);
- ``relu(s*x + t) == s * clamp(x, lo, hi) + t'`` per channel (lo/hi by the sign of s):
  the LGC's input BN + ReLU becomes one clamp, s goes into the weights, t' into the bias;
- ``relu(y + b) == max(y, -b) + b``: with ReLU before the 3x3 conv, the bias is pushed
  through it as a fixed (k, H, W) map (zero padding makes it vary at the border).

Narrow LGCs may run as one dense GEMM over all inputs (zeros where pruned: no gather, no
shuffle) and narrow SFRs as one GEMM accumulated into x (no scatter); the choice per
layer is measured (``_default_*_mode``) and can be forced with the layer's declared
``fast_modes`` (:class:`~cdnv2.compact.CompactDenseLayer`).

Plans live in a side store keyed by layer (:func:`plan_for`), never in the modules
themselves, so copies, ``state_dict`` and exporters see plain modules. A plan is rebuilt
when a source tensor changed (in place, moved, cast) or the layer's ``train()`` /
``eval()`` dropped it (:func:`forget_plan`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .fold import NotFoldable, fold_layer

if TYPE_CHECKING:
    from .dense import CompactDenseLayer

_INF = float("inf")

def _relu_fold(s: torch.Tensor, t: torch.Tensor):
    """relu(s*x + t) == s_eff * clamp(x, lo, hi) + t_eff, channel by channel.

    s > 0: lo = -t/s; s < 0: hi = -t/s; s == 0 (or -t/s out of range): a constant
    channel, s_eff = 0 and t_eff = relu(t), no clamp.
    """
    ratio = -t / s
    const = (s == 0) | ~torch.isfinite(ratio) | (ratio.abs() > 1e30)
    lo = torch.where((s > 0) & ~const, ratio, torch.full_like(s, -_INF))
    hi = torch.where((s < 0) & ~const, ratio, torch.full_like(s, _INF))
    s_eff = torch.where(const, torch.zeros_like(s), s)
    t_eff = torch.where(const, t.clamp_min(0), t)
    return lo, hi, s_eff, t_eff, bool(((s < 0) & ~const).any())


@dataclass
class Plan:
    """Tensors the fused path derives from one layer's parameters (rebuilt on change)."""

    lgc_mode: str  # "grouped" | "dense"
    sfr_mode: str | None  # "grouped" | "dense" | None (no SFR)
    act1: str
    act2: str
    act3: str | None
    idx1: torch.Tensor | None = None  # grouped: selected input channels
    lo: torch.Tensor | None = None  # relu: clamp bounds of the LGC input
    hi: torch.Tensor | None = None  # only when some BN scale is negative
    s1: torch.Tensor | None = None  # other acts: BN of the LGC input
    t1: torch.Tensor | None = None
    w1: torch.Tensor | None = None  # (G, O/G, m) grouped or (O, c) dense, BNs folded
    b1: torch.Tensor | None = None  # LGC output bias (grouped or dense layout)
    bias_through: bool = False  # relu before the 3x3: max(y, -b) and a bias map after
    nb1: torch.Tensor | None = None  # -b1 laid out like the post-op's input
    b_int: torch.Tensor | None = None  # b1 in interleaved order, for the bias map
    s3: torch.Tensor | None = None
    t3: torch.Tensor | None = None
    w_sfr: torch.Tensor | None = None  # SFR weight: (c, k) dense or (G, c'/G, k/G) grouped
    idx_s: torch.Tensor | None = None  # grouped SFR: target channel of each produced one
    conv3_mode: str = "conv"  # "conv" (oneDNN grouped) | "depthwise" (per-output dw + sum)
    w_dw: list = field(default_factory=list)  # depthwise weights, one per output of a group
    maps: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)

    def gather_rows(self, batch: int, width: int, group_major: bool) -> torch.Tensor:
        """Row indices into the (B * width, HW) buffer view for the gather.

        Batch-major rows give (B, c', HW); group-major rows give (c', B, HW), so each
        group's GEMM sees all images at once (one big GEMM per group, not B*G tiny ones).
        """
        key = (batch, width, group_major)
        rows = self.rows.get(key)
        if rows is None:
            base = torch.arange(batch, device=self.idx1.device) * width
            if group_major:
                rows = (self.idx1[:, None] + base[None, :]).reshape(-1)
            else:
                rows = (base[:, None] + self.idx1[None, :]).reshape(-1)
            if len(self.rows) > 8:
                self.rows.clear()
            self.rows[key] = rows
        return rows

    def bias_map(self, conv3: nn.Conv2d, hgt: int, wid: int) -> torch.Tensor:
        """conv3x3 of the constant LGC bias (zero padded): (1, k, H, W)."""
        m = self.maps.get((hgt, wid))
        if m is None:
            const = self.b_int.view(1, -1, 1, 1).expand(1, -1, hgt, wid)
            m = F.conv2d(const, conv3.weight, conv3.bias, 1, 1, 1, conv3.groups)
            if len(self.maps) > 8:
                self.maps.clear()
            self.maps[(hgt, wid)] = m
        return m


def _default_lgc_mode(layer: "CompactDenseLayer") -> str:
    # Measured on a 2-core x86 CPU at batch 32: one dense GEMM beats gather + grouped
    # GEMM + shuffle while the dense multiply-adds stay small (the early, narrow layers).
    lgc = layer.conv_1
    return "dense" if lgc.in_channels * lgc.out_channels <= 512 else "grouped"


def _default_sfr_mode(layer: "CompactDenseLayer") -> str:
    sfr = layer.sfr
    return "dense" if sfr.out_channels * sfr.in_channels <= 128 else "grouped"


def _default_conv3_mode(layer: "CompactDenseLayer", pixels: int) -> str:
    # oneDNN runs 3x3 convs with 4-8 input channels per group as im2col + GEMM, 3-5x
    # slower than its depthwise kernel. With n outputs per group, the grouped conv equals
    # n depthwise convs (one per output of a group), each summed over the group's
    # inputs: worth it for n == 1, and for n == 2 at 56x56 and above.
    conv3 = layer.conv_2.conv
    n = conv3.out_channels // conv3.groups
    return "depthwise" if n == 1 or (n == 2 and pixels >= 56 * 56) else "conv"


def _layer_modes(layer: "CompactDenseLayer") -> tuple[str, str | None]:
    modes = layer.fast_modes
    lgc = modes.get("lgc") or _default_lgc_mode(layer)
    sfr = None if layer.sfr is None else (modes.get("sfr") or _default_sfr_mode(layer))
    return lgc, sfr


def conv3_mode(layer: "CompactDenseLayer", plan: "Plan", pixels: int) -> str:
    mode = layer.fast_modes.get("conv3") or _default_conv3_mode(layer, pixels)
    return mode if plan.w_dw else "conv"


def _fold_lgc_input(plan: Plan, s1: torch.Tensor, t1: torch.Tensor, dt: torch.dtype):
    """Per-input (weight scale, bias shift) that the GEMM absorbs for the LGC's BN + act."""
    if plan.act1 == "relu":
        lo, hi, s_eff, t_eff, neg = _relu_fold(s1, t1)
        plan.lo = lo.to(dt)[:, None]
        plan.hi = hi.to(dt)[:, None] if neg else None
        return s_eff, t_eff
    plan.s1, plan.t1 = s1.to(dt)[:, None], t1.to(dt)[:, None]
    return torch.ones_like(s1), torch.zeros_like(t1)


def build_plan(layer: "CompactDenseLayer") -> Plan | None:
    """The layer's plan from its folded pieces (:func:`~cdnv2.compact.fold.fold_layer`);
    None when the layer does not fold (the plain module path runs then)."""
    try:
        f = fold_layer(layer)
    except NotFoldable:
        return None
    dt = layer.conv_1.conv.weight.dtype
    lgc_mode, sfr_mode = _layer_modes(layer)
    dense_pre = f.dense_pre() if lgc_mode == "dense" else None
    if dense_pre is None:  # the copies of an input channel disagree: no per-input BN
        lgc_mode = "grouped"
    plan = Plan(lgc_mode, sfr_mode, f.pre_act, f.mid_act, f.sfr.act if f.sfr is not None else None)
    g, n = f.weight.shape[:2]
    if lgc_mode == "dense":
        wd = f.dense_weight()  # interleaved rows: output d*G+g
        se, te = _fold_lgc_input(plan, *dense_pre, dt)
        plan.w1 = (wd * se[None, :]).to(dt)
        b = wd @ te + f.dense_bias()
        plan.b_int = b
        plan.b1 = b.to(dt)[:, None]
        plan.nb1 = (-b).to(dt)[:, None]
    else:
        plan.idx1 = f.index
        m = f.weight.shape[2]
        se, te = _fold_lgc_input(plan, f.pre_scale, f.pre_shift, dt)
        plan.w1 = (f.weight * se.view(g, 1, m)).to(dt)
        b = (f.weight @ te.view(g, m, 1))[..., 0] + f.bias  # (G, n)
        plan.b_int = b.t().reshape(-1)
        plan.b1 = b.to(dt).view(1, g, n, 1)
        plan.nb1 = (-b).to(dt).t().reshape(1, n, g, 1)  # for the transposed (shuffled) view
    plan.bias_through = plan.act2 == "relu" and isinstance(layer.se, nn.Identity)
    conv3 = f.conv3
    if conv3.kernel_size == (3, 3) and conv3.out_channels // conv3.groups <= 2:
        g3, n3 = conv3.groups, conv3.out_channels // conv3.groups
        w3 = conv3.weight.reshape(g3, n3, conv3.in_channels // g3, 3, 3)
        plan.w_dw = [w3[:, j].reshape(conv3.in_channels, 1, 3, 3).contiguous() for j in range(n3)]
    plan.b_int = plan.b_int.to(dt)
    if f.sfr is not None:
        s3, t3 = f.sfr.scale.to(dt), f.sfr.shift.to(dt)
        k, gs = s3.numel(), f.sfr.groups
        if sfr_mode == "dense":
            plan.s3, plan.t3 = s3[:, None], t3[:, None]
            plan.w_sfr = f.sfr.dense_weight.to(dt)
        else:  # BN in the interleaved -> grouped order of the conv's input
            plan.s3 = s3.view(k // gs, gs).t().reshape(1, gs, k // gs, 1).contiguous()
            plan.t3 = t3.view(k // gs, gs).t().reshape(1, gs, k // gs, 1).contiguous()
            plan.w_sfr = f.sfr.weight.to(dt)
            plan.idx_s = f.sfr.index
    return plan


def _plan_sources(layer: "CompactDenseLayer") -> list[torch.Tensor]:
    mods = [layer.conv_1, layer.conv_2] + ([layer.sfr] if layer.sfr is not None else [])
    return [t for mod in mods for t in (*mod.parameters(), *mod.buffers())]


# layer -> (source tensors, their (version, data pointer), fast_modes, plan)
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def plan_for(layer: "CompactDenseLayer") -> Plan | None:
    """The layer's plan (None: not foldable), rebuilt when a source tensor changed.

    The sources are collected when the plan is built (walking the modules on every call
    costs ~2 ms per forward of cdnv2_c); ``train()`` / ``eval()`` drop the plan, so a
    parameter *object* replaced in eval mode is picked up after the next ``eval()``.
    """
    modes = layer.fast_modes
    cached = _PLANS.get(layer)
    if cached is not None:
        sources, stamp, plan_modes, plan = cached
        if plan_modes == modes and all(
            t._version == v and t.data_ptr() == p for t, (v, p) in zip(sources, stamp)
        ):
            return plan
    sources = _plan_sources(layer)
    plan = build_plan(layer)
    stamp = [(t._version, t.data_ptr()) for t in sources]
    _PLANS[layer] = (sources, stamp, dict(modes), plan)
    return plan


def forget_plan(layer: nn.Module) -> None:
    _PLANS.pop(layer, None)
