"""Compact layers: what LGC, SFR and LearnedLinear become once their masks are final.

Three families, all built from shapes alone (so a model can be restructured from a
state dict before loading it) or from a fully condensed masked layer:

- Inference forms, SPEC 6. :class:`CompactLGC` gathers the kept inputs of every group
  (``index``), applies BN and the activation to them, runs a grouped 1x1 conv and
  shuffles the outputs back to the interleaved order. :class:`CompactSFR` runs BN, act,
  a grouped 1x1 conv over the contiguous input groups and scatter-adds each produced
  channel into its target channel of ``x`` (``index``; duplicates sum).
  :class:`CompactLinear` reads the kept inputs of a condensed classifier.
- Training forms. :class:`CompactTrainLGC` keeps BN and the activation on the *full*
  input, so its statistics and parameters stay those of the masked layer, then gathers,
  convolves and shuffles. The SFR needs no separate training form: its BN already runs
  on all of ``h``, so :class:`CompactSFR` (out-of-place ``index_add``) trains as it is.
- :class:`CompactDenseLayer` / :class:`CompactDenseBlock`: the dense layer and block of
  the inference model. Under ``torch.no_grad()`` in eval mode they run a fused path
  (bottom of this file); otherwise the plain module-by-module path.

Index buffers are stored as small integers (int16 below 32768 channels) to keep
artifacts small; the kernels read a cached int64 copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import create_act
from .condensing import LearnedGroupConv, LearnedLinear, SparseFeatureReactivation
from .conv_unit import PreActConv
from .shuffle import grouped_to_interleaved, interleaved_to_grouped
from .squeeze_excite import SqueezeExcite


def _index_dtype(channels: int) -> torch.dtype:
    return torch.int16 if channels <= 2**15 else torch.int32


def _check_sizes(name: str, grouped: int, pruned: int, groups: int, condense_factor: int) -> None:
    if groups < 1 or condense_factor < 1:
        raise ValueError(f"{name}: groups={groups} and condense_factor={condense_factor} must be >= 1")
    if grouped % groups:
        raise ValueError(f"{name}: {grouped} grouped channels are not divisible by groups={groups}")
    if pruned % condense_factor:
        raise ValueError(
            f"{name}: {pruned} prunable channels are not divisible by condense_factor={condense_factor}"
        )


def _require_final(masked: nn.Module) -> None:
    if not masked.fully_condensed:
        raise ValueError(
            f"{type(masked).__name__} is at stage {int(masked.stage)} of {masked.num_steps}; "
            "only a fully condensed layer has a compact form"
        )


class _IndexMixin:
    """Keeps an int64 copy of the small-int ``index`` buffer for the kernels."""

    _index_buffer = "index"

    def long_index(self) -> torch.Tensor:
        idx = getattr(self, self._index_buffer)
        key = (idx.data_ptr(), idx._version, idx.device)
        cached = self.__dict__.get("_long_index_cache")
        if cached is None or cached[0] != key:
            cached = (key, idx.long())
            self.__dict__["_long_index_cache"] = cached
        return cached[1]


# ----------------------------------------------------------------------------- gathers
# Each maps a masked layer's weight-shaped tensor (weight, gradient, momentum buffer) to
# the compact conv weight's layout. The optimizer hand-over reuses them.


def gather_lgc_weight(t: torch.Tensor, kept: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, I, 1, 1) masked LGC tensor -> (O, I/C, 1, 1) grouped-conv layout.

    Row ``g * O/G + d`` holds output ``d * G + g`` (group-contiguous) and reads the kept
    inputs ``kept[g]`` of its group.
    """
    out_ch, in_ch = t.shape[:2]
    per = out_ch // groups
    t = t.reshape(per, groups, in_ch).transpose(0, 1)  # (G, O/G, I): [g, d] = output d*G+g
    idx = kept.to(t.device).long()[:, None, :].expand(groups, per, kept.shape[1])
    return t.gather(2, idx).reshape(out_ch, kept.shape[1], 1, 1).contiguous()


def gather_sfr_weight(t: torch.Tensor, kept: torch.Tensor, groups: int) -> torch.Tensor:
    """(c, k, 1, 1) masked SFR tensor -> (G * c/C, k/G, 1, 1) grouped-conv layout.

    Row ``g * c/C + t`` produces the contribution of input group ``g`` (inputs
    ``j * G + g``) to its ``t``-th kept target channel ``kept[g, t]``.
    """
    out_ch, in_ch = t.shape[:2]
    t = t.reshape(out_ch, in_ch // groups, groups).permute(2, 0, 1)  # (G, c, k/G)
    idx = kept.to(t.device).long()[:, :, None].expand(groups, kept.shape[1], in_ch // groups)
    return t.gather(1, idx).reshape(groups * kept.shape[1], in_ch // groups, 1, 1).contiguous()


def gather_linear_weight(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(O, I, 1, 1) masked LearnedLinear tensor -> (O, I/C) over the kept inputs."""
    return t.reshape(t.shape[0], t.shape[1])[:, kept.to(t.device).long().flatten()].contiguous()


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, index: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            s, d = getattr(src, name), getattr(dst, name)
            if s is None or d is None:
                continue
            d.copy_(s if index is None else s[index])
        if src.num_batches_tracked is not None and dst.num_batches_tracked is not None:
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


# ----------------------------------------------------------------------------- LGC
class CompactLGC(_IndexMixin, nn.Module):
    """Inference LGC: ``x[:, index]`` -> BN -> act -> grouped 1x1 conv -> shuffle.

    ``index`` lists the kept inputs of group 0, then of group 1, ...; the BN runs on
    these ``G * I / C`` selected channels with the statistics of their source channels.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, condense_factor: int,
                 act: str = "relu"):
        super().__init__()
        _check_sizes(type(self).__name__, out_channels, in_channels, groups, condense_factor)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor, self.act_name = groups, condense_factor, act
        self.selected = groups * in_channels // condense_factor
        self.norm = nn.BatchNorm2d(self.selected)
        self.act = create_act(act)
        self.conv = nn.Conv2d(self.selected, out_channels, 1, groups=groups, bias=False)
        self.register_buffer("index", torch.zeros(self.selected, dtype=_index_dtype(in_channels)))

    @classmethod
    def empty_like(cls, masked: LearnedGroupConv) -> "CompactLGC":
        return cls(masked.in_channels, masked.out_channels, groups=masked.groups,
                   condense_factor=masked.condense_factor, act=masked.act_name)

    @classmethod
    def from_masked(cls, masked: LearnedGroupConv) -> "CompactLGC":
        _require_final(masked)
        new = cls.empty_like(masked).to(masked.conv.weight)
        kept = masked.kept_indices()  # (G, I/C)
        flat = kept.flatten()
        with torch.no_grad():
            new.index.copy_(flat)
            new.conv.weight.copy_(gather_lgc_weight(masked.conv.weight, kept, masked.groups))
        _copy_bn(new.norm, masked.norm, flat)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.index_select(1, self.long_index())
        return grouped_to_interleaved(self.conv(self.act(self.norm(x))), self.groups)

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        # The conv, BN and act are child modules and counted there; here the moves.
        moved = self.selected * inputs[0][0, 0].numel() + output[0].numel()
        return 0.0, float(moved)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}, selected={self.selected}")


class CompactTrainLGC(_IndexMixin, nn.Module):
    """Training LGC: BN -> act on the full input, then gather, grouped conv, shuffle.

    The BN keeps all ``I`` channels (its statistics are those of the masked layer and
    keep training the same way); only the pruned weights are gone.
    """

    _index_buffer = "train_index"

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, condense_factor: int,
                 act: str = "relu"):
        super().__init__()
        _check_sizes(type(self).__name__, out_channels, in_channels, groups, condense_factor)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor, self.act_name = groups, condense_factor, act
        self.selected = groups * in_channels // condense_factor
        self.norm = nn.BatchNorm2d(in_channels)
        self.act = create_act(act)
        self.conv = nn.Conv2d(self.selected, out_channels, 1, groups=groups, bias=False)
        self.register_buffer("train_index", torch.zeros(self.selected, dtype=_index_dtype(in_channels)))

    @classmethod
    def empty_like(cls, masked: LearnedGroupConv) -> "CompactTrainLGC":
        return cls(masked.in_channels, masked.out_channels, groups=masked.groups,
                   condense_factor=masked.condense_factor, act=masked.act_name)

    @classmethod
    def from_masked(cls, masked: LearnedGroupConv, *, share_norm: bool = True) -> "CompactTrainLGC":
        """``share_norm``: reuse the masked layer's BN module (same parameter objects)."""
        _require_final(masked)
        new = cls.empty_like(masked).to(masked.conv.weight)
        kept = masked.kept_indices()
        with torch.no_grad():
            new.train_index.copy_(kept.flatten())
            new.conv.weight.copy_(gather_lgc_weight(masked.conv.weight, kept, masked.groups))
        if share_norm:
            new.norm = masked.norm
        else:
            _copy_bn(new.norm, masked.norm)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.norm(x)).index_select(1, self.long_index())
        return grouped_to_interleaved(self.conv(a), self.groups)

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        moved = self.selected * inputs[0][0, 0].numel() + output[0].numel()
        return 0.0, float(moved)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}, selected={self.selected}")


# ----------------------------------------------------------------------------- SFR
class CompactSFR(_IndexMixin, nn.Module):
    """Condensed SFR: BN(k) -> act -> grouped 1x1 conv -> scatter-add into ``x``.

    ``forward(x, h)`` returns the reactivated ``x`` (out of place, autograd-safe), as
    :class:`~cdnv2.layers.SparseFeatureReactivation` does. Produced channel ``r`` is
    added to channel ``index[r]`` of ``x``; channels picked by several groups get the
    sum. The same module serves inference and training (BN already sees all of h).
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, condense_factor: int,
                 act: str = "relu"):
        super().__init__()
        _check_sizes(type(self).__name__, in_channels, out_channels, groups, condense_factor)
        self.in_channels, self.out_channels = in_channels, out_channels  # k, c
        self.groups, self.condense_factor, self.act_name = groups, condense_factor, act
        self.produced = groups * out_channels // condense_factor
        self.norm = nn.BatchNorm2d(in_channels)
        self.act = create_act(act)
        self.conv = nn.Conv2d(in_channels, self.produced, 1, groups=groups, bias=False)
        self.register_buffer("index", torch.zeros(self.produced, dtype=_index_dtype(out_channels)))

    @classmethod
    def empty_like(cls, masked: SparseFeatureReactivation) -> "CompactSFR":
        return cls(masked.in_channels, masked.out_channels, groups=masked.groups,
                   condense_factor=masked.condense_factor, act=masked.act_name)

    @classmethod
    def from_masked(cls, masked: SparseFeatureReactivation, *, share_norm: bool = False) -> "CompactSFR":
        _require_final(masked)
        if masked.conv.bias is not None:
            raise ValueError("CompactSFR: an SFR conv with a bias has no compact form")
        new = cls.empty_like(masked).to(masked.conv.weight)
        kept = masked.kept_indices()  # (G, c/C) target channels per input group
        with torch.no_grad():
            new.index.copy_(kept.flatten())
            new.conv.weight.copy_(gather_sfr_weight(masked.conv.weight, kept, masked.groups))
        if share_norm:
            new.norm = masked.norm
        else:
            _copy_bn(new.norm, masked.norm)
        return new

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        s = self.conv(interleaved_to_grouped(self.act(self.norm(h)), self.groups))
        return x.index_add(1, self.long_index(), s)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent (c, k) routing-free dense weight (the masked layer's W * M)."""
        g, k, c = self.groups, self.in_channels, self.out_channels
        w = self.conv.weight.reshape(g, self.produced // g, k // g)
        dense = w.new_zeros(c, k // g, g)  # [target, j, g] = input channel j*G+g
        rows = self.long_index().view(g, -1)
        for gi in range(g):  # a group picks each target at most once: no collisions
            dense[rows[gi], :, gi] = w[gi]
        return dense.reshape(c, k)

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        h = inputs[1]
        pixels = h[0, 0].numel()
        moved = h[0].numel() + self.produced * pixels  # shuffle of h, scatter-add of s
        return 0.0, float(moved)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}, produced={self.produced}")


# ----------------------------------------------------------------------------- linear
class CompactLinear(_IndexMixin, nn.Module):
    """Condensed classifier: ``linear(x[:, index])`` (inference and training)."""

    def __init__(self, in_features: int, out_features: int, *, condense_factor: int):
        super().__init__()
        _check_sizes(type(self).__name__, out_features, in_features, 1, condense_factor)
        self.in_features, self.out_features, self.condense_factor = in_features, out_features, condense_factor
        self.kept = in_features // condense_factor
        self.linear = nn.Linear(self.kept, out_features)
        self.register_buffer("index", torch.zeros(self.kept, dtype=_index_dtype(in_features)))

    @classmethod
    def empty_like(cls, masked: LearnedLinear) -> "CompactLinear":
        return cls(masked.in_channels, masked.out_channels, condense_factor=masked.condense_factor)

    @classmethod
    def from_masked(cls, masked: LearnedLinear, *, share_bias: bool = False) -> "CompactLinear":
        _require_final(masked)
        new = cls.empty_like(masked).to(masked.conv.weight)
        kept = masked.kept_indices()
        with torch.no_grad():
            new.index.copy_(kept.flatten())
            new.linear.weight.copy_(gather_linear_weight(masked.conv.weight, kept))
            if share_bias:
                new.linear.bias = masked.conv.bias
            else:
                new.linear.bias.copy_(masked.conv.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(1, self.long_index()))

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        return 0.0, float(self.kept)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, condense_factor={self.condense_factor}"


# ----------------------------------------------------------------------------- dense layer
class CompactDenseLayer(nn.Module):
    """Inference dense layer: compact LGC -> 3x3 -> [SE] -> [compact SFR]; concat.

    The same math as :class:`~cdnv2.models.DenseLayer` with compact 1x1 layers. Child
    names match the masked layer, so state-dict keys differ only inside LGC/SFR.
    """

    def __init__(self, conv_1: CompactLGC, conv_2: PreActConv, se: nn.Module, sfr: CompactSFR | None):
        super().__init__()
        self.conv_1, self.conv_2, self.se, self.sfr = conv_1, conv_2, se, sfr
        self.in_channels = conv_1.in_channels
        self.growth = conv_2.conv.out_channels

    @classmethod
    def empty_like(cls, layer: nn.Module) -> "CompactDenseLayer":
        """Same shapes as the masked ``layer`` (weights uninitialised)."""
        conv_1 = CompactLGC.empty_like(layer.conv_1)
        sfr = CompactSFR.empty_like(layer.sfr) if layer.sfr is not None else None
        new = cls(conv_1, layer.conv_2, layer.se, sfr)
        return new

    @classmethod
    def from_dense_layer(cls, layer: nn.Module) -> "CompactDenseLayer":
        """Compact copy of a fully condensed masked layer (3x3 conv and SE are shared)."""
        conv_1 = CompactLGC.from_masked(layer.conv_1)
        sfr = CompactSFR.from_masked(layer.sfr) if layer.sfr is not None else None
        return cls(conv_1, layer.conv_2, layer.se, sfr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_ok(self):
            return _fast_layer_forward(self, x)
        h = self.se(self.conv_2(self.conv_1(x)))
        if self.sfr is not None:
            x = self.sfr(x, h)
        return torch.cat([x, h], 1)


class CompactDenseBlock(nn.Sequential):
    """A dense block of :class:`CompactDenseLayer`; in eval/no-grad it writes every
    layer's output into one preallocated block buffer (no concatenation copies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_ok(self):
            return _fast_block_forward(self, x)
        return super().forward(x)


def _fast_ok(module: nn.Module) -> bool:
    """The fused path runs in eval mode without autograd and without hooks to observe."""
    if module.training or torch.is_grad_enabled():
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return True


# ============================================================================= fused path
# Eval + no_grad only. Every dense layer of a block writes into one block buffer
# (B, c_out, H, W): the layer reads x = buf[:, :c], adds its SFR output into that slice in
# place and writes h into buf[:, c:c+k], so there are no concatenation copies. Large
# scratch tensors come from one workspace per block, so the big activations are not
# allocated (and page-faulted) op by op. Folds, all exact up to float rounding:
# - the 3x3 unit's BN (conv_2.norm) is affine right after the LGC conv: folded into the
#   GEMM weights and a bias (the shuffle only permutes channels);
# - relu(s*x + t) == s * clamp(x, lo, hi) + t' per channel (lo/hi from the sign of s):
#   the LGC's input BN + ReLU becomes one clamp, with s folded into the weights and
#   t' into the bias;
# - the LGC can run as a dense GEMM over all inputs (zeros where pruned; no gather, no
#   shuffle) and the SFR as a dense GEMM accumulated into x (baddbmm, no scatter):
#   cheaper for the narrow early layers, where everything is memory-bound.

import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402

_INF = float("inf")


def _bn_affine(bn: nn.Module, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eval-mode BN as (scale, shift) in float64; None if it is not a plain affine map."""
    if isinstance(bn, nn.Identity):
        return like.new_ones(channels, dtype=torch.float64), like.new_zeros(channels, dtype=torch.float64)
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        return None
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _relu_fold(s: torch.Tensor, t: torch.Tensor):
    """relu(s*x + t) == s_eff * clamp(x, lo, hi) + t_eff, channel by channel."""
    ratio = -t / s
    const = (s == 0) | ~torch.isfinite(ratio) | (ratio.abs() > 1e30)
    lo = torch.where(s > 0, ratio, torch.full_like(s, -_INF))
    hi = torch.where(s < 0, ratio, torch.full_like(s, _INF))
    lo = torch.where(const, torch.zeros_like(s), lo)
    hi = torch.where(const, torch.zeros_like(s), hi)
    s_eff = torch.where(const, torch.zeros_like(s), s)
    t_eff = torch.where(const, t.clamp_min(0), t)
    return lo, hi, s_eff, t_eff


def _act_kind(act: nn.Module) -> str:
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.Hardswish):
        return "hswish"
    return "module"


def _apply_act_(kind: str, module: nn.Module, t: torch.Tensor) -> None:
    if kind == "relu":
        t.clamp_(min=0)
    elif kind == "hswish":
        F.hardswish(t, inplace=True)
    else:
        t.copy_(module(t.clone()))


def _act_into(kind: str, module: nn.Module, src: torch.Tensor, out: torch.Tensor) -> None:
    if kind == "relu":
        torch.clamp(src, min=0, out=out)
    elif kind == "hswish":
        torch.ops.aten.hardswish.out(src, out=out)
    else:
        out.copy_(module(src.clone()))


@dataclass
class _Plan:
    lgc_mode: str
    sfr_mode: str | None
    act1: str
    act2: str
    act3: str | None
    # LGC
    idx1: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    s1: torch.Tensor | None = None
    t1: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    # SFR
    s3: torch.Tensor | None = None
    t3: torch.Tensor | None = None
    ws: torch.Tensor | None = None
    idx_s: torch.Tensor | None = None


def _plan_sources(layer: "CompactDenseLayer") -> list[torch.Tensor]:
    mods = [layer.conv_1, layer.conv_2.norm] + ([layer.sfr] if layer.sfr is not None else [])
    out = []
    for m in mods:
        out += list(m.parameters()) + list(m.buffers())
    return out


def _layer_modes(layer: "CompactDenseLayer") -> tuple[str, str | None]:
    """Dense or grouped kernels for the LGC and the SFR (set by measurement or by rule)."""
    modes = getattr(layer, "fast_modes", None) or {}
    lgc = modes.get("lgc") or _default_lgc_mode(layer)
    sfr = None if layer.sfr is None else (modes.get("sfr") or _default_sfr_mode(layer))
    return lgc, sfr


def _default_lgc_mode(layer: "CompactDenseLayer") -> str:
    # Measured on a 2-core x86 CPU: the dense GEMM wins while its extra multiply-adds are
    # fewer than ~the gather and shuffle passes it saves, i.e. for narrow inputs.
    lgc = layer.conv_1
    return "dense" if lgc.in_channels * lgc.out_channels <= 24 * 32 else "grouped"


def _default_sfr_mode(layer: "CompactDenseLayer") -> str:
    sfr = layer.sfr
    return "dense" if sfr.out_channels * sfr.in_channels <= 512 * 16 else "grouped"


def _build_plan(layer: "CompactDenseLayer") -> _Plan | None:
    lgc, pre3 = layer.conv_1, layer.conv_2
    conv3 = pre3.conv
    if conv3.stride != (1, 1) or conv3.padding != (1, 1) or conv3.dilation != (1, 1):
        return None
    dt = lgc.conv.weight.dtype
    lgc_mode, sfr_mode = _layer_modes(layer)
    bn1 = _bn_affine(lgc.norm, lgc.selected, lgc.conv.weight)
    bn2 = _bn_affine(pre3.norm, lgc.out_channels, lgc.conv.weight)
    if bn1 is None or bn2 is None:
        return None
    plan = _Plan(lgc_mode, sfr_mode, _act_kind(lgc.act), _act_kind(pre3.act),
                 _act_kind(layer.sfr.act) if layer.sfr is not None else None)
    g, o, c = lgc.groups, lgc.out_channels, lgc.in_channels
    n, m = o // g, lgc.selected // g
    idx = lgc.long_index()
    w = lgc.conv.weight.double().reshape(g, n, m)
    s1, t1 = bn1
    s2, t2 = bn2
    if lgc_mode == "dense":
        # Per input channel BN; the copies of one source channel must agree.
        s_full = s1.new_zeros(c).index_copy(0, idx, s1)
        t_full = t1.new_zeros(c).index_copy(0, idx, t1)
        if not (torch.equal(s_full[idx], s1) and torch.equal(t_full[idx], t1)):
            plan.lgc_mode = lgc_mode = "grouped"
    if lgc_mode == "dense":
        wd = w.new_zeros(n, g, c)
        for gi in range(g):
            wd[:, gi, idx[gi * m:(gi + 1) * m]] = w[gi]
        wd = wd.reshape(o, c)  # interleaved rows: output d*G+g
        if plan.act1 == "relu":
            lo, hi, se, te = _relu_fold(s_full, t_full)
            plan.lo, plan.hi = lo.to(dt)[:, None], hi.to(dt)[:, None]
            plan.w1 = (s2[:, None] * wd * se[None, :]).to(dt)
            plan.b1 = (s2 * (wd @ te) + t2).to(dt)[:, None]
        else:
            plan.s1, plan.t1 = s_full.to(dt)[:, None], t_full.to(dt)[:, None]
            plan.w1 = (s2[:, None] * wd).to(dt)
            plan.b1 = t2.to(dt)[:, None]
    else:
        perm = torch.arange(o, device=idx.device).view(n, g).t().reshape(-1)  # grouped <- interleaved
        s2g, t2g = s2[perm].view(g, n), t2[perm].view(g, n)
        plan.idx1 = idx
        if plan.act1 == "relu":
            lo, hi, se, te = _relu_fold(s1, t1)
            plan.lo, plan.hi = lo.to(dt)[:, None], hi.to(dt)[:, None]
            plan.w1 = (s2g[:, :, None] * w * se.view(g, 1, m)).to(dt)
            plan.b1 = (s2g * (w @ te.view(g, m, 1))[..., 0] + t2g).to(dt).view(1, g, n, 1)
        else:
            plan.s1, plan.t1 = s1.to(dt)[:, None], t1.to(dt)[:, None]
            plan.w1 = (s2g[:, :, None] * w).to(dt)
            plan.b1 = t2g.to(dt).view(1, g, n, 1)
    if layer.sfr is not None:
        sfr = layer.sfr
        bn3 = _bn_affine(sfr.norm, sfr.in_channels, sfr.conv.weight)
        if bn3 is None:
            return None
        s3, t3 = (v.to(dt) for v in bn3)
        k, gs = sfr.in_channels, sfr.groups
        if sfr_mode == "dense":
            plan.s3, plan.t3 = s3[:, None], t3[:, None]
            plan.ws = sfr.dense_weight().to(dt)
        else:
            plan.s3 = s3.view(k // gs, gs).t().reshape(1, gs, k // gs, 1).contiguous()
            plan.t3 = t3.view(k // gs, gs).t().reshape(1, gs, k // gs, 1).contiguous()
            plan.ws = sfr.conv.weight.reshape(gs, sfr.produced // gs, k // gs)
            plan.idx_s = sfr.long_index()
    return plan


def _get_plan(layer: "CompactDenseLayer") -> _Plan | None:
    sources = _plan_sources(layer)
    key = (tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources),
           tuple(sorted((getattr(layer, "fast_modes", None) or {}).items())))
    cached = layer.__dict__.get("_fast_plan")
    if cached is None or cached[0] != key:
        cached = (key, _build_plan(layer))
        layer.__dict__["_fast_plan"] = cached
    return cached[1]


class _Workspace:
    """Named scratch tensors, reused by all layers of a block (and across calls)."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def reserve(self, like: torch.Tensor, sizes: dict[str, int]) -> None:
        for name, numel in sizes.items():
            t = self.bufs.get(name)
            if t is None or t.numel() < numel or t.dtype != like.dtype or t.device != like.device:
                self.bufs[name] = like.new_empty(numel)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.bufs[name][:numel].view(shape)


_THREAD = threading.local()
# Keep scratch memory between calls (per thread): large fresh allocations are mmap'ed
# and page-faulted on every call, which costs more than the arithmetic at batch 32.
KEEP_WORKSPACE = True


def _workspace() -> _Workspace:
    if not KEEP_WORKSPACE:
        return _Workspace()
    ws = getattr(_THREAD, "ws", None)
    if ws is None:
        ws = _THREAD.ws = _Workspace()
    return ws


def release_workspace() -> None:
    """Free this thread's scratch memory of the fused path."""
    _THREAD.ws = None


def _reserve_for(layers: list, batch: int, pixels: int, like: torch.Tensor, ws: _Workspace) -> None:
    need = {"sel": 0, "y": 0, "y2": 0, "a3": 0, "s": 0}
    for layer in layers:
        lgc = layer.conv_1
        need["sel"] = max(need["sel"], max(lgc.selected, lgc.in_channels))
        need["y"] = max(need["y"], lgc.out_channels)
        need["y2"] = max(need["y2"], lgc.out_channels)
        if layer.sfr is not None:
            need["a3"] = max(need["a3"], layer.sfr.in_channels)
            need["s"] = max(need["s"], layer.sfr.produced)
    ws.reserve(like, {k: v * batch * pixels for k, v in need.items() if v})


def _layer_into(layer: "CompactDenseLayer", plan: _Plan, buf: torch.Tensor, c: int, ws: _Workspace) -> None:
    """Run ``layer`` on buf[:, :c]; write h to buf[:, c:c+k], reactivate buf[:, :c] in place."""
    b, _, hgt, wid = buf.shape
    hw = hgt * wid
    lgc = layer.conv_1
    g, o = lgc.groups, lgc.out_channels
    n = o // g
    xv = buf[:, :c].flatten(2)  # (B, c, HW), batch stride = buffer width
    # ---- LGC (+ the 3x3 unit's BN, folded) -> y2: act(BN2(conv1(...))) in interleaved order
    if plan.lgc_mode == "dense":
        a = ws.get("sel", (b, c, hw))
        if plan.act1 == "relu":
            torch.clamp(xv, min=plan.lo, max=plan.hi, out=a)
        else:
            torch.addcmul(plan.t1, xv, plan.s1, out=a)
            _apply_act_(plan.act1, lgc.act, a)
        y2 = ws.get("y2", (b, o, hw))
        torch.matmul(plan.w1, a, out=y2)
        y2.add_(plan.b1)
        _apply_act_(plan.act2, layer.conv_2.act, y2)
    else:
        sel = ws.get("sel", (b, lgc.selected, hw))
        torch.index_select(xv, 1, plan.idx1, out=sel)
        if plan.act1 == "relu":
            sel.clamp_(min=plan.lo, max=plan.hi)
        else:
            torch.addcmul(plan.t1, sel, plan.s1, out=sel)
            _apply_act_(plan.act1, lgc.act, sel)
        y = ws.get("y", (b, g, n, hw))
        torch.matmul(plan.w1, sel.view(b, g, lgc.selected // g, hw), out=y)
        y.add_(plan.b1)
        y2 = ws.get("y2", (b, o, hw))
        _act_into(plan.act2, layer.conv_2.act, y.transpose(1, 2), y2.view(b, n, g, hw))
    conv3 = layer.conv_2.conv
    h = F.conv2d(y2.view(b, o, hgt, wid), conv3.weight, conv3.bias, 1, 1, 1, conv3.groups)
    h = layer.se(h)
    k = h.shape[1]
    buf[:, c:c + k].copy_(h)
    # ---- SFR: x += scatter(conv(act(BN3(h))))
    if layer.sfr is None:
        return
    sfr = layer.sfr
    hv = h.reshape(b, k, hw)
    if plan.sfr_mode == "dense":
        a3 = ws.get("a3", (b, k, hw))
        torch.addcmul(plan.t3, hv, plan.s3, out=a3)
        _apply_act_(plan.act3, sfr.act, a3)
        xv.baddbmm_(plan.ws.expand(b, c, k), a3)
    else:
        gs = sfr.groups
        a3 = ws.get("a3", (b, gs, k // gs, hw))
        torch.addcmul(plan.t3, hv.view(b, k // gs, gs, hw).transpose(1, 2), plan.s3, out=a3)
        _apply_act_(plan.act3, sfr.act, a3)
        s = ws.get("s", (b, gs, sfr.produced // gs, hw))
        torch.matmul(plan.ws, a3, out=s)
        xv.index_add_(1, plan.idx_s, s.view(b, sfr.produced, hw))


def _run_layers(layers: list, x: torch.Tensor) -> torch.Tensor | None:
    plans = [_get_plan(layer) for layer in layers]
    if any(p is None for p in plans):
        return None
    b, c, hgt, wid = x.shape
    width = c + sum(layer.growth for layer in layers)
    buf = x.new_empty(b, width, hgt, wid)
    buf[:, :c].copy_(x)
    ws = _workspace()
    _reserve_for(layers, b, hgt * wid, buf, ws)
    for layer, plan in zip(layers, plans):
        _layer_into(layer, plan, buf, c, ws)
        c += layer.growth
    return buf


def _fast_layer_forward(layer: "CompactDenseLayer", x: torch.Tensor) -> torch.Tensor:
    out = _run_layers([layer], x)
    if out is None:  # something not foldable (e.g. BN without running stats)
        h = layer.se(layer.conv_2(layer.conv_1(x)))
        return torch.cat([layer.sfr(x, h) if layer.sfr is not None else x, h], 1)
    return out


def _fast_block_forward(block: "CompactDenseBlock", x: torch.Tensor) -> torch.Tensor:
    layers = list(block)
    if not all(isinstance(layer, CompactDenseLayer) for layer in layers):
        return nn.Sequential.forward(block, x)
    out = _run_layers(layers, x)
    return nn.Sequential.forward(block, x) if out is None else out
