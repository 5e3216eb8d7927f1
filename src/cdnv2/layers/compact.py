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
- :class:`CompactDenseLayer` / :class:`CompactDenseBlock` / :class:`CompactFeatures`: the
  dense layer, block and feature extractor of the inference model. Under
  ``torch.no_grad()`` in eval mode they run a fused path (bottom of this file);
  otherwise the plain module-by-module path.

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
    """Keeps an int64 copy of the small-int ``index`` buffer for the kernels; builds a
    compact layer with the shapes of a masked LGC/SFR (``empty_like``)."""

    @classmethod
    def empty_like(cls, masked: nn.Module):
        return cls(masked.in_channels, masked.out_channels, groups=masked.groups,
                   condense_factor=masked.condense_factor, act=masked.act_name)

    _index_buffer = "index"

    def long_index(self) -> torch.Tensor:
        idx = getattr(self, self._index_buffer)
        key = (idx.data_ptr(), idx._version, idx.device)
        cached = self.__dict__.get("_long_index_cache")
        if cached is None or cached[0] != key:
            cached = (key, idx.long())
            self.__dict__["_long_index_cache"] = cached
        return cached[1]


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` for (B, C, H, W) ``x`` as one row gather of the (B*C, H*W) view.

    ``index_select`` along dim 1 copies channel by channel (~7x slower on CPU); the row
    form is a plain memcpy per row, forward and (as index_add) backward.
    """
    b, c, hgt, wid = x.shape
    rows = (torch.arange(b, device=x.device) * c)[:, None] + index[None, :]
    return x.reshape(b * c, hgt * wid).index_select(0, rows.reshape(-1)).view(b, -1, hgt, wid)


def _group_major_rows(index: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """Rows of a (B*C, H*W) view: every image of channel index[0], then of index[1], ..."""
    return (index[:, None] + torch.arange(batch, device=index.device)[None, :] * channels).reshape(-1)


def lgc_gemm(a: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Gather the kept inputs ``index`` of ``a`` and run the grouped 1x1 conv, shuffled.

    (B, C, H, W) -> (B, O, H, W) with output ``d * G + g`` in interleaved order. For the
    largest and the smallest images the rows are gathered group-major, so each group is
    one GEMM over all images; in between, one GEMM per image and group was faster
    (measured on 2 threads, forward + backward of cdnv2_b's layers).
    """
    b, c, hgt, wid = a.shape
    hw, o, m = hgt * wid, weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, o // groups, m)
    if 14 * 14 <= hw <= 56 * 56:
        rows = (torch.arange(b, device=a.device)[:, None] * c + index[None, :]).reshape(-1)
        sel = a.reshape(b * c, hw).index_select(0, rows)
        y = torch.matmul(w, sel.view(b, groups, m, hw))  # (B, G, O/G, HW)
        return y.transpose(1, 2).reshape(b, o, hgt, wid)
    sel = a.reshape(b * c, hw).index_select(0, _group_major_rows(index, b, c))
    y = torch.bmm(w, sel.view(groups, m, b * hw))
    return y.view(groups, o // groups, b, hw).permute(2, 1, 0, 3).reshape(b, o, hgt, wid)


def sfr_gemm_add(x: torch.Tensor, a: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                 groups: int) -> torch.Tensor:
    """``x`` plus the grouped 1x1 conv of ``a`` scattered to channels ``index`` (out of place).

    ``a``'s interleaved input groups are made contiguous (group-major, all images per
    group), one GEMM per group, then one row ``index_add`` into a copy of ``x``.
    """
    b, k, hgt, wid = a.shape
    c, hw = x.shape[1], hgt * wid
    a_g = a.reshape(b, k // groups, groups, hw).permute(2, 1, 0, 3).reshape(groups, k // groups, b * hw)
    s = torch.bmm(weight.reshape(groups, -1, k // groups), a_g)  # (G, c'/G, B*HW)
    dt = torch.promote_types(x.dtype, s.dtype)  # as x + s would (mixed under autocast)
    out = x.to(dt).reshape(b * c, hw).index_add(0, _group_major_rows(index, b, c), s.view(-1, hw).to(dt))
    return out.view(b, c, hgt, wid)


def grouped_conv1x1(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1x1 conv as a batched GEMM: (B, Cin, H, W) -> (B, G, Cout/G, H*W).

    oneDNN runs 1x1 convs with a few channels per group 2-4x slower than this
    (measured, forward and backward). Callers reshape (or shuffle) the result.
    """
    b, cin, hgt, wid = x.shape
    w = weight.reshape(groups, weight.shape[0] // groups, cin // groups)
    return torch.matmul(w, x.reshape(b, groups, cin // groups, hgt * wid))


def _conv_cost(conv: nn.Conv2d, pixels: int) -> float:
    return float(conv.in_channels // conv.groups * conv.out_channels * pixels)


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
        a = self.act(self.norm(gather_channels(x, self.long_index())))
        y = grouped_conv1x1(a, self.conv.weight, self.groups)  # (B, G, O/G, HW)
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *x.shape[2:])  # shuffle

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        # BN and act run as child modules and are counted there; the conv runs here.
        pixels = inputs[0][0, 0].numel()
        conv = _conv_cost(self.conv, pixels)
        moved = self.selected * pixels + output[0].numel()  # gather, shuffle
        return conv, conv + moved

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
        return lgc_gemm(self.act(self.norm(x)), self.long_index(), self.conv.weight, self.groups)

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        pixels = inputs[0][0, 0].numel()
        conv = _conv_cost(self.conv, pixels)
        moved = self.selected * pixels + output[0].numel()
        return conv, conv + moved

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
        return sfr_gemm_add(x, self.act(self.norm(h)), self.long_index(), self.conv.weight, self.groups)

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
        conv = _conv_cost(self.conv, pixels)
        moved = h[0].numel() + self.produced * pixels  # shuffle of h, scatter-add of s
        return conv, conv + moved

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
        return 0.0, float(self.kept)  # the gather; the linear is a child module

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, condense_factor={self.condense_factor}"


# ----------------------------------------------------------------------------- dense layer
class _FusedMixin:
    """train()/eval() drop what the fused path cached about this module."""

    def train(self, mode: bool = True):
        self.__dict__.pop("_fast_modules", None)
        self.__dict__.pop("_fast_plan", None)
        return super().train(mode)


class CompactDenseLayer(_FusedMixin, nn.Module):
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
        """Compact LGC/SFR of the masked ``layer``'s shapes (to be loaded); its 3x3 unit
        and SE modules are taken over as they are."""
        conv_1 = CompactLGC.empty_like(layer.conv_1)
        sfr = CompactSFR.empty_like(layer.sfr) if layer.sfr is not None else None
        return cls(conv_1, layer.conv_2, layer.se, sfr)

    @classmethod
    def from_dense_layer(cls, layer: nn.Module) -> "CompactDenseLayer":
        """Compact copy of a fully condensed masked layer (3x3 conv and SE are shared)."""
        conv_1 = CompactLGC.from_masked(layer.conv_1)
        sfr = CompactSFR.from_masked(layer.sfr) if layer.sfr is not None else None
        return cls(conv_1, layer.conv_2, layer.se, sfr)

    def clear_fast_cache(self) -> None:
        """Drop the tensors the fused path derived from this layer's parameters."""
        self.__dict__.pop("_fast_plan", None)
        self.__dict__.pop("_fast_modules", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_ok(self):
            return _fast_layer_forward(self, x)
        h = self.se(self.conv_2(self.conv_1(x)))
        if self.sfr is not None:
            x = self.sfr(x, h)
        return torch.cat([x, h], 1)


class CompactDenseBlock(_FusedMixin, nn.Sequential):
    """A dense block of :class:`CompactDenseLayer`; in eval/no-grad it writes every
    layer's output into one preallocated block buffer (no concatenation copies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_ok(self):
            return _fast_block_forward(self, x)
        return super().forward(x)


class CompactFeatures(_FusedMixin, nn.Sequential):
    """A feature extractor holding :class:`CompactDenseBlock` s (e.g. ``model.features``).

    In eval/no-grad, a 2x2 average-pool transition writes its output straight into the
    next block's buffer, and block buffers that only feed a transition or a BN come from
    the reusable workspace. Otherwise it is a plain ``nn.Sequential``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_ok(self):
            return _fast_features_forward(self, x)
        return super().forward(x)


def _fast_ok(module: nn.Module) -> bool:
    """The fused path runs in eval mode without autograd and without hooks to observe."""
    if module.training or torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    # The submodule list is cached (walking ~600 modules per call costs ~2 ms); train()
    # and eval() refresh it, as they do the plans.
    mods = module.__dict__.get("_fast_modules")
    if mods is None:
        mods = module.__dict__["_fast_modules"] = list(module.modules())
    for m in mods:
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return True





# ============================================================================= fused path
# Eval + no_grad only; the same math as the modules above, in fewer passes over memory.
# Every dense layer of a block writes into one block buffer (B, c_out, H, W): it reads
# x = buf[:, :c], adds its SFR output into that slice in place and writes h into
# buf[:, c:c+k], so there are no concatenation copies. Scratch tensors come from a
# per-thread workspace kept between calls: at batch 32 the early activations exceed
# glibc's mmap threshold, and a fresh allocation costs page faults worth ~10 passes.
# Folds (exact up to float rounding):
# - the 3x3 unit's BN (conv_2.norm) is affine right after the LGC conv: it goes into the
#   GEMM weights and a bias (the shuffle only permutes channels);
# - relu(s*x + t) == s * clamp(x, lo, hi) + t' per channel (lo/hi by the sign of s): the
#   LGC's input BN + ReLU becomes one clamp, s goes into the weights, t' into the bias;
# - relu(y + b) == max(y, -b) + b: with ReLU before the 3x3 conv, the bias is pushed
#   through it as a fixed (k, H, W) map (zero padding makes it vary at the border), added
#   while h is written into the block buffer;
# - the gather reads rows of the (B * width, H * W) buffer (a fast row copy), and the
#   transition's 2x2 average pool is two strided adds into the next block's buffer.
# Narrow LGCs may run as one dense GEMM over all inputs (zeros where pruned: no gather,
# no shuffle) and narrow SFRs as one GEMM accumulated into x (baddbmm, no scatter).

import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

_INF = float("inf")
# Up to this many pixels per image the LGC runs one GEMM per group over all images.
_GROUP_MAJOR_PIXELS = 28 * 28
# Depthwise form of the 3x3 conv: images per call so that its output stays about this big.
_DW_CHUNK_BYTES = 2 << 20
# Keep scratch memory between calls (per thread). False: allocate per call.
KEEP_WORKSPACE = True
_THREAD = threading.local()


def _bn_affine(bn: nn.Module, channels: int, like: torch.Tensor):
    """Eval-mode BN as float64 (scale, shift); None if it is not a fixed affine map."""
    if isinstance(bn, nn.Identity):
        return like.new_ones(channels, dtype=torch.float64), like.new_zeros(channels, dtype=torch.float64)
    # Any eval-mode BN with running statistics (SyncBatchNorm too) is a fixed affine map.
    if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
            or bn.running_mean is None or bn.running_var is None):
        return None
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


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
    ws: torch.Tensor | None = None
    idx_s: torch.Tensor | None = None
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
    modes = getattr(layer, "fast_modes", None) or {}
    lgc = modes.get("lgc") or _default_lgc_mode(layer)
    sfr = None if layer.sfr is None else (modes.get("sfr") or _default_sfr_mode(layer))
    return lgc, sfr


def _conv3_mode(layer: "CompactDenseLayer", plan: "_Plan", pixels: int) -> str:
    mode = (getattr(layer, "fast_modes", None) or {}).get("conv3") or _default_conv3_mode(layer, pixels)
    return mode if plan.w_dw else "conv"


def _fold_lgc_input(plan: _Plan, s1: torch.Tensor, t1: torch.Tensor, dt: torch.dtype):
    """Per-input (weight scale, bias shift) that the GEMM absorbs for the LGC's BN + act."""
    if plan.act1 == "relu":
        lo, hi, s_eff, t_eff, neg = _relu_fold(s1, t1)
        plan.lo = lo.to(dt)[:, None]
        plan.hi = hi.to(dt)[:, None] if neg else None
        return s_eff, t_eff
    plan.s1, plan.t1 = s1.to(dt)[:, None], t1.to(dt)[:, None]
    return torch.ones_like(s1), torch.zeros_like(t1)


def _build_plan(layer: "CompactDenseLayer") -> _Plan | None:
    lgc, pre3 = layer.conv_1, layer.conv_2
    conv3 = pre3.conv
    if conv3.stride != (1, 1) or conv3.padding != (1, 1) or conv3.dilation != (1, 1):
        return None
    dt = lgc.conv.weight.dtype
    bn1 = _bn_affine(lgc.norm, lgc.selected, lgc.conv.weight)
    bn2 = _bn_affine(pre3.norm, lgc.out_channels, lgc.conv.weight)
    if bn1 is None or bn2 is None:
        return None
    lgc_mode, sfr_mode = _layer_modes(layer)
    g, o, c = lgc.groups, lgc.out_channels, lgc.in_channels
    n, m = o // g, lgc.selected // g
    idx = lgc.long_index()
    (s1, t1), (s2, t2) = bn1, bn2
    if lgc_mode == "dense":  # BN per input channel: the copies of a channel must agree
        s_full = s1.new_zeros(c).index_copy(0, idx, s1)
        t_full = t1.new_zeros(c).index_copy(0, idx, t1)
        if not (torch.equal(s_full[idx], s1) and torch.equal(t_full[idx], t1)):
            lgc_mode = "grouped"
    plan = _Plan(lgc_mode, sfr_mode, _act_kind(lgc.act), _act_kind(pre3.act),
                 _act_kind(layer.sfr.act) if layer.sfr is not None else None)
    w = lgc.conv.weight.double().reshape(g, n, m)
    if lgc_mode == "dense":
        wd = w.new_zeros(n, g, c)
        for gi in range(g):
            wd[:, gi, idx[gi * m:(gi + 1) * m]] = w[gi]
        wd = wd.reshape(o, c)  # interleaved rows: output d*G+g
        se, te = _fold_lgc_input(plan, s_full, t_full, dt)
        plan.w1 = (s2[:, None] * wd * se[None, :]).to(dt)
        b = s2 * (wd @ te) + t2
        plan.b_int = b
        plan.b1 = b.to(dt)[:, None]
        plan.nb1 = (-b).to(dt)[:, None]
    else:
        plan.idx1 = idx
        perm = torch.arange(o, device=idx.device).view(n, g).t().reshape(-1)  # grouped <- interleaved
        s2g, t2g = s2[perm].view(g, n), t2[perm].view(g, n)
        se, te = _fold_lgc_input(plan, s1, t1, dt)
        plan.w1 = (s2g[:, :, None] * w * se.view(g, 1, m)).to(dt)
        b = s2g * (w @ te.view(g, m, 1))[..., 0] + t2g  # (G, n)
        plan.b_int = b.t().reshape(-1)
        plan.b1 = b.to(dt).view(1, g, n, 1)
        plan.nb1 = (-b).to(dt).t().reshape(1, n, g, 1)  # for the transposed (shuffled) view
    plan.bias_through = plan.act2 == "relu" and isinstance(layer.se, nn.Identity)
    if conv3.kernel_size == (3, 3) and conv3.out_channels // conv3.groups <= 2:
        g3, n3 = conv3.groups, conv3.out_channels // conv3.groups
        w3 = conv3.weight.reshape(g3, n3, conv3.in_channels // g3, 3, 3)
        plan.w_dw = [w3[:, j].reshape(conv3.in_channels, 1, 3, 3).contiguous() for j in range(n3)]
    plan.b_int = plan.b_int.to(dt)
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
        else:  # BN in the interleaved -> grouped order of the conv's input
            plan.s3 = s3.view(k // gs, gs).t().reshape(1, gs, k // gs, 1).contiguous()
            plan.t3 = t3.view(k // gs, gs).t().reshape(1, gs, k // gs, 1).contiguous()
            plan.ws = sfr.conv.weight.reshape(gs, sfr.produced // gs, k // gs)
            plan.idx_s = sfr.long_index()
    return plan


def _plan_sources(layer: "CompactDenseLayer") -> list[torch.Tensor]:
    mods = [layer.conv_1, layer.conv_2] + ([layer.sfr] if layer.sfr is not None else [])
    return [t for mod in mods for t in (*mod.parameters(), *mod.buffers())]


def _get_plan(layer: "CompactDenseLayer") -> _Plan | None:
    """The layer's plan, rebuilt when a source tensor changed (in place, moved, cast).

    The sources are collected when the plan is built (walking the modules on every call
    costs ~2 ms per forward of cdnv2_c); ``train()`` / ``eval()`` and ``fast_modes``
    changes drop the plan, so a parameter *object* replaced in eval mode is picked up
    after the next ``eval()`` (or ``clear_fast_cache()``).
    """
    cached = layer.__dict__.get("_fast_plan")
    modes = layer.__dict__.get("fast_modes")
    if cached is not None:
        sources, stamp, plan_modes, plan = cached
        if plan_modes == modes and all(
            t._version == v and t.data_ptr() == p for t, (v, p) in zip(sources, stamp)
        ):
            return plan
    sources = _plan_sources(layer)
    plan = _build_plan(layer)
    stamp = [(t._version, t.data_ptr()) for t in sources]
    layer.__dict__["_fast_plan"] = (sources, stamp, dict(modes) if modes else modes, plan)
    return plan


class _Workspace:
    """Named scratch tensors, reused by all layers (and, per thread, across calls)."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def reserve(self, like: torch.Tensor, sizes: dict[str, int]) -> None:
        # Tensors made under inference_mode cannot be written outside it: replace them.
        stale_inference = not torch.is_inference_mode_enabled()
        for name, numel in sizes.items():
            t = self.bufs.get(name)
            if (t is None or t.numel() < numel or t.dtype != like.dtype or t.device != like.device
                    or (stale_inference and t.is_inference())):
                self.bufs.pop(name, None)  # free the old one before allocating
                self.bufs[name] = like.new_empty(numel)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.bufs[name][:numel].view(shape)


def _workspace() -> _Workspace:
    if not KEEP_WORKSPACE:
        return _Workspace()
    ws = getattr(_THREAD, "ws", None)
    if ws is None:
        ws = _THREAD.ws = _Workspace()
    return ws


def release_workspace() -> None:
    """Free the calling thread's scratch memory of the fused path."""
    _THREAD.ws = None


def _reserve_for(layers: list, batch: int, pixels: int, like: torch.Tensor, ws: _Workspace) -> None:
    need = {"sel": 0, "y": 0, "y2": 0, "a3": 0, "s": 0}
    for layer in layers:
        lgc = layer.conv_1
        need["sel"] = max(need["sel"], lgc.selected, lgc.in_channels)
        need["y"] = max(need["y"], lgc.out_channels)
        need["y2"] = max(need["y2"], lgc.out_channels)
        if layer.sfr is not None:
            need["a3"] = max(need["a3"], layer.sfr.in_channels)
            need["s"] = max(need["s"], layer.sfr.produced)
    ws.reserve(like, {k: v * batch * pixels for k, v in need.items() if v})


def _clamp_(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor | None) -> None:
    t.clamp_(min=lo)  # one bound per pass: two tensor bounds at once are ~5x slower
    if hi is not None:
        t.clamp_(max=hi)


def _layer_into(layer: "CompactDenseLayer", plan: _Plan, buf: torch.Tensor, c: int, ws: _Workspace) -> None:
    """Run ``layer`` on buf[:, :c]: h goes to buf[:, c:c+k], buf[:, :c] is reactivated."""
    b, width, hgt, wid = buf.shape
    hw = hgt * wid
    lgc = layer.conv_1
    g, o = lgc.groups, lgc.out_channels
    n = o // g
    xv = buf[:, :c].flatten(2)  # (B, c, HW); batch stride = buffer width
    # ---- LGC with the 3x3 unit's BN folded -> y2 = act2(BN2(lgc(x))) (minus the bias
    # when it is pushed through the 3x3 conv), interleaved channel order
    y2 = ws.get("y2", (b, o, hw))
    if plan.lgc_mode == "dense":
        a = ws.get("sel", (b, c, hw))
        if plan.act1 == "relu":
            torch.clamp(xv, min=plan.lo, out=a)
            if plan.hi is not None:
                a.clamp_(max=plan.hi)
        else:
            torch.addcmul(plan.t1, xv, plan.s1, out=a)
            _apply_act_(plan.act1, lgc.act, a)
        torch.matmul(plan.w1, a, out=y2)
        if plan.bias_through:
            y2.clamp_(min=plan.nb1)
        else:
            y2.add_(plan.b1)
            _apply_act_(plan.act2, layer.conv_2.act, y2)
    else:
        # Small images: group-major rows, one GEMM per group over all images.
        group_major = hw <= _GROUP_MAJOR_PIXELS
        m = lgc.selected // g
        rows = plan.gather_rows(b, width, group_major)
        if group_major:
            sel = ws.get("sel", (lgc.selected, b, hw))
            bn_shape = (lgc.selected, 1, 1)
        else:
            sel = ws.get("sel", (b, lgc.selected, hw))
            bn_shape = (lgc.selected, 1)
        torch.index_select(buf.view(b * width, hw), 0, rows, out=sel.view(b * lgc.selected, hw))
        if plan.act1 == "relu":
            _clamp_(sel, plan.lo.view(bn_shape), None if plan.hi is None else plan.hi.view(bn_shape))
        else:
            torch.addcmul(plan.t1.view(bn_shape), sel, plan.s1.view(bn_shape), out=sel)
            _apply_act_(plan.act1, lgc.act, sel)
        if group_major:
            y = ws.get("y", (g, n, b, hw))
            torch.bmm(plan.w1, sel.view(g, m, b * hw), out=y.view(g, n, b * hw))
            y_shuffled = y.permute(2, 1, 0, 3)  # (B, n, G, HW): channel d*G+g
            bias = plan.b1.view(g, n, 1, 1)
        else:
            y = ws.get("y", (b, g, n, hw))
            torch.matmul(plan.w1, sel.view(b, g, m, hw), out=y)
            y_shuffled = y.transpose(1, 2)
            bias = plan.b1
        y2v = y2.view(b, n, g, hw)
        if plan.bias_through:
            torch.clamp(y_shuffled, min=plan.nb1, out=y2v)
        else:
            y.add_(bias)
            _act_into(plan.act2, layer.conv_2.act, y_shuffled, y2v)
    # ---- 3x3 grouped conv (+ SE) -> h, written into the block buffer
    conv3 = layer.conv_2.conv
    k = conv3.out_channels
    hbuf = buf[:, c:c + k]
    if _conv3_mode(layer, plan, hw) == "depthwise":
        _conv3_depthwise_into(y2.view(b, o, hgt, wid), plan.w_dw, conv3.groups, hbuf)
        if plan.bias_through:
            hbuf.add_(plan.bias_map(conv3, hgt, wid))
        else:
            if conv3.bias is not None:
                hbuf.add_(conv3.bias.view(1, -1, 1, 1))
            if not isinstance(layer.se, nn.Identity):
                hbuf.copy_(layer.se(hbuf))
    else:
        h = F.conv2d(y2.view(b, o, hgt, wid), conv3.weight, None if plan.bias_through else conv3.bias,
                     1, 1, 1, conv3.groups)
        if plan.bias_through:
            torch.add(h, plan.bias_map(conv3, hgt, wid), out=hbuf)
        else:
            hbuf.copy_(layer.se(h))
    if layer.sfr is None:
        return
    # ---- SFR: x += scatter(conv(act(BN3(h))))
    sfr = layer.sfr
    hv = hbuf.flatten(2)
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
        if b <= 4:  # one row index_add: fewer, bigger steps than channel slices of 1 image
            key = ("sfr", b, width)
            rows = plan.rows.get(key)
            if rows is None:
                base = torch.arange(b, device=buf.device) * width
                rows = plan.rows[key] = (base[:, None] + plan.idx_s[None, :]).reshape(-1)
            buf.view(b * width, hw).index_add_(0, rows, s.view(b * sfr.produced, hw))
        else:
            xv.index_add_(1, plan.idx_s, s.view(b, sfr.produced, hw))


def _conv3_depthwise_into(y: torch.Tensor, w_dw: list, groups: int, out: torch.Tensor) -> None:
    """out = grouped 3x3 conv of y (no bias) as depthwise convs summed over each group.

    Runs a few images at a time so the depthwise output (as wide as y) stays ~2 MB:
    cache-resident and reused from the heap instead of freshly page-faulted.
    """
    b, o, hgt, wid = y.shape
    hw = hgt * wid
    n, m = len(w_dw), o // groups
    step = max(1, _DW_CHUNK_BYTES // (o * hw * y.element_size()))
    for s in range(0, b, step):
        y_s = y[s:s + step]
        o_s = out[s:s + step].flatten(2).view(-1, groups, n, hw)
        for j, w in enumerate(w_dw):
            d = F.conv2d(y_s, w, None, 1, 1, 1, o)
            torch.sum(d.view(-1, groups, m, hw), 2, out=o_s[:, :, j])


def _is_pool2(m: nn.Module) -> bool:
    """A plain 2x2 / stride-2 average pool (what the dense-net transitions are)."""
    two = (2, (2, 2))
    return (isinstance(m, nn.AvgPool2d) and m.kernel_size in two and m.stride in two
            and m.padding in (0, (0, 0)) and not m.ceil_mode and m.divisor_override is None)


def _pool2_into(x: torch.Tensor, out: torch.Tensor, ws: _Workspace) -> None:
    """out = avg_pool2d(x, 2): two strided adds (avg_pool2d itself is ~5x slower here)."""
    b, c, hgt, wid = x.shape
    h2, w2 = hgt // 2, wid // 2
    x = x[:, :, :2 * h2, :2 * w2]
    ws.reserve(x, {"pool": b * c * h2 * 2 * w2})
    rows = ws.get("pool", (b, c, h2, 2 * w2))
    torch.add(x[:, :, 0::2], x[:, :, 1::2], out=rows)
    torch.add(rows[..., 0::2], rows[..., 1::2], out=out)
    out.mul_(0.25)


def _run_block(layers: list, x: torch.Tensor, *, pool: bool = False, buffer_name: str | None = None):
    """Fused block: input (optionally 2x2-pooled first) -> block buffer. None if not foldable."""
    plans = [_get_plan(layer) for layer in layers]
    if any(p is None for p in plans) or x.dim() != 4 or x.dtype != layers[0].conv_1.conv.weight.dtype:
        return None
    b, c, hgt, wid = x.shape
    if pool:
        hgt, wid = hgt // 2, wid // 2
    width = c + sum(layer.growth for layer in layers)
    ws = _workspace()
    if buffer_name is not None and KEEP_WORKSPACE:
        ws.reserve(x, {buffer_name: b * width * hgt * wid})
        buf = ws.get(buffer_name, (b, width, hgt, wid))
    else:
        buf = x.new_empty(b, width, hgt, wid)
    if pool:
        _pool2_into(x, buf[:, :c], ws)
    else:
        buf[:, :c].copy_(x)
    _reserve_for(layers, b, hgt * wid, buf, ws)
    for layer, plan in zip(layers, plans):
        _layer_into(layer, plan, buf, c, ws)
        c += layer.growth
    return buf


def _sequential(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(block, x)


def _fast_layer_forward(layer: "CompactDenseLayer", x: torch.Tensor) -> torch.Tensor:
    out = _run_block([layer], x)
    if out is None:  # something not foldable (e.g. a BN without running statistics)
        h = layer.se(layer.conv_2(layer.conv_1(x)))
        return torch.cat([layer.sfr(x, h) if layer.sfr is not None else x, h], 1)
    return out


def _fast_block_forward(block: "CompactDenseBlock", x: torch.Tensor) -> torch.Tensor:
    layers = list(block)
    if not all(isinstance(layer, CompactDenseLayer) for layer in layers):
        return _sequential(block, x)
    out = _run_block(layers, x)
    return _sequential(block, x) if out is None else out


def _fast_features_forward(seq: "CompactFeatures", x: torch.Tensor) -> torch.Tensor:
    children = list(seq)
    pool, flip = False, 0
    for i, m in enumerate(children):
        nxt = children[i + 1] if i + 1 < len(children) else None
        if _is_pool2(m) and isinstance(nxt, CompactDenseBlock):
            pool = True  # fused into the next block's buffer
            continue
        if isinstance(m, CompactDenseBlock) and all(isinstance(layer, CompactDenseLayer) for layer in m):
            # A buffer that only feeds a transition or a BN may live in the workspace;
            # the blocks alternate between two so a pool can read one and write the other.
            internal = nxt is not None and (_is_pool2(nxt) or isinstance(nxt, nn.BatchNorm2d))
            out = _run_block(list(m), x, pool=pool, buffer_name=f"block{flip}" if internal else None)
            if out is None:
                out = m(F.avg_pool2d(x, 2) if pool else x)
            x, pool, flip = out, False, 1 - flip
            continue
        if pool:  # not reached: a fused pool is always followed by a block
            x, pool = F.avg_pool2d(x, 2), False
        x = m(x)
    return x
