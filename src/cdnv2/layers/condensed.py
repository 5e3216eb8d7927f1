"""Compact layers: what LGC, SFR and LearnedLinear become once their masks are final.

Built from shapes alone (``empty_like``: a model restructured from a state dict before
loading it) or from a fully condensed masked layer (``from_masked``), SPEC 6:

- :class:`CompactLGC` (inference) gathers the kept inputs of every group (``index``),
  applies BN and the activation to them, runs a grouped 1x1 conv and shuffles the outputs
  back to the interleaved order.
- :class:`CompactTrainLGC` (training) keeps BN and the activation on the *full* input, so
  its statistics and parameters stay those of the masked layer, then gathers, convolves
  and shuffles.
- :class:`CompactSFR` runs BN, act, a grouped 1x1 conv over the contiguous input groups
  and scatter-adds each produced channel into its target channel of ``x`` (``index``;
  duplicates sum). Its BN already runs on all of ``h``, so the same module trains.
- :class:`CompactLinear` reads the kept inputs of a condensed classifier.

Index buffers are stored as small integers (int16 below 32768 channels) to keep
artifacts small; the kernels read ``index_long``, an int64 copy that is not saved and is
refreshed whenever the index is set or loaded (never in ``forward``).
"""
from __future__ import annotations

import torch
from torch import nn

from .activations import create_act
from .condensing import (
    CondensingConv1x1,
    LearnedLinear,
    SparseFeatureReactivation,
    check_condense_sizes,
)
from .index_kernels import (
    gather_channels,
    gather_lgc_weight,
    gather_linear_weight,
    gather_sfr_weight,
    grouped_conv1x1,
    index_dtype,
    lgc_gemm,
    sfr_gemm_add,
)


def copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, index: torch.Tensor | None = None) -> None:
    """Copy parameters, statistics and settings of ``src`` (channels ``index`` only) to ``dst``."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            s, d = getattr(src, name), getattr(dst, name)
            if s is None or d is None:
                continue
            d.copy_(s if index is None else s[index])
        if src.num_batches_tracked is not None and dst.num_batches_tracked is not None:
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


def _require_final(masked: CondensingConv1x1) -> None:
    if not masked.fully_condensed:
        raise ValueError(
            f"{type(masked).__name__} is at stage {int(masked.stage)} of {masked.num_steps}; "
            "only a fully condensed layer has a compact form"
        )


def _refresh_index_long(module: nn.Module, incompatible_keys=None) -> None:
    index = getattr(module, module.index_buffer)
    limit = getattr(module, "index_limit", None)
    if limit is not None and index.numel() and not index.is_meta and (index.min() < 0 or index.max() >= limit):
        # A loaded file's values are not trusted: out of range, they fail (or read memory) in forward.
        raise RuntimeError(f"{type(module).__name__}.{module.index_buffer} holds channel indices outside "
                           f"[0, {limit}) (min {int(index.min())}, max {int(index.max())})")
    module.index_long = index.long()


class CompactIndexed(nn.Module):
    """A compact layer with a stored index buffer (``index_buffer``) and its int64 copy."""

    index_buffer = "index"  # the state-dict name (the training LGC's differs: it marks the form)

    def _register_index(self, size: int, channels: int) -> None:
        self.index_limit = channels  # indices address channels [0, channels)
        self.register_buffer(self.index_buffer, torch.zeros(size, dtype=index_dtype(channels)))
        self.register_buffer("index_long", torch.zeros(size, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_index_long)

    def set_index(self, index: torch.Tensor) -> None:
        with torch.no_grad():
            getattr(self, self.index_buffer).copy_(index)
        _refresh_index_long(self)


class CompactConv1x1(CompactIndexed):
    """Shared shape of the compact LGC / training LGC / SFR: BN -> act -> grouped 1x1 conv
    over the kept channels. LGCs group their outputs and keep ``G * I / C`` inputs
    (``selected``); the SFR groups its inputs and produces ``G * O / C`` outputs
    (``produced``)."""

    prunes_inputs = True  # LGC; the SFR prunes (scatters to) outputs
    norm_on_kept = False  # CompactLGC: BN on the gathered channels only
    kept_name = "selected"

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, condense_factor: int,
                 act: str = "relu"):
        super().__init__()
        grouped, pruned = (out_channels, in_channels) if self.prunes_inputs else (in_channels, out_channels)
        check_condense_sizes(type(self).__name__, grouped, pruned, groups, condense_factor)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor, self.act_name = groups, condense_factor, act
        self.kept = groups * pruned // condense_factor
        self.norm = nn.BatchNorm2d(self.kept if self.norm_on_kept else in_channels)
        self.act = create_act(act)
        conv_in, conv_out = (self.kept, out_channels) if self.prunes_inputs else (in_channels, self.kept)
        self.conv = nn.Conv2d(conv_in, conv_out, 1, groups=groups, bias=False)
        self._register_index(self.kept, pruned)

    @classmethod
    def empty_like(cls, masked: CondensingConv1x1):
        """A compact layer of ``masked``'s shapes (weights to be loaded)."""
        return cls(masked.in_channels, masked.out_channels, groups=masked.groups,
                   condense_factor=masked.condense_factor, act=masked.act_name)

    @staticmethod
    def gather_weight(weight: torch.Tensor, kept: torch.Tensor, groups: int) -> torch.Tensor:
        return gather_lgc_weight(weight, kept, groups)

    @classmethod
    def from_masked(cls, masked: CondensingConv1x1, *, share_norm: bool = False):
        """Compact copy of a fully condensed ``masked`` layer; ``share_norm``: reuse its BN
        module (the same parameter objects, for training)."""
        _require_final(masked)
        if share_norm and cls.norm_on_kept:
            raise ValueError(f"{cls.__name__}: its BN covers the selected channels only; it cannot share one")
        new = cls.empty_like(masked).to(masked.conv.weight)
        kept = masked.kept_indices()  # (G, kept per group)
        new.set_index(kept.flatten())
        with torch.no_grad():
            new.conv.weight.copy_(cls.gather_weight(masked.conv.weight, kept, masked.groups))
        if share_norm:
            new.norm = masked.norm
        else:
            copy_bn(new.norm, masked.norm, new.index_long if cls.norm_on_kept else None)
        return new

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        """(multiply-adds, ops incl. the gather/shuffle/scatter passes) per sample; BN and
        act run as child modules and are counted there."""
        pixels = inputs[-1][0, 0].numel()
        conv = float(self.conv.in_channels // self.groups * self.conv.out_channels * pixels)
        grouped = self.out_channels if self.prunes_inputs else self.in_channels
        return conv, conv + (self.kept + grouped) * pixels  # gather + shuffle (LGC), shuffle + scatter (SFR)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}, {self.kept_name}={self.kept}")


class CompactLGC(CompactConv1x1):
    """Inference LGC: ``x[:, index]`` -> BN -> act -> grouped 1x1 conv -> shuffle.

    ``index`` lists the kept inputs of group 0, then of group 1, ...; the BN runs on
    these ``G * I / C`` selected channels with the statistics of their source channels.
    """

    norm_on_kept = True

    @property
    def selected(self) -> int:
        return self.kept

    @classmethod
    def from_training(cls, train: "CompactTrainLGC") -> "CompactLGC":
        """The inference form of a training LGC (its BN narrowed to the selected channels)."""
        new = cls(train.in_channels, train.out_channels, groups=train.groups,
                  condense_factor=train.condense_factor, act=train.act_name).to(train.conv.weight)
        new.set_index(train.train_index)
        with torch.no_grad():
            new.conv.weight.copy_(train.conv.weight)
        copy_bn(new.norm, train.norm, train.index_long)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.norm(gather_channels(x, self.index_long)))
        y = grouped_conv1x1(a, self.conv.weight, self.groups)  # (B, G, O/G, HW)
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *x.shape[2:])  # shuffle


class CompactTrainLGC(CompactConv1x1):
    """Training LGC: BN -> act on the full input, then gather, grouped conv, shuffle.

    The BN keeps all ``I`` channels (its statistics are those of the masked layer and
    keep training the same way); only the pruned weights are gone.
    """

    index_buffer = "train_index"

    @property
    def selected(self) -> int:
        return self.kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lgc_gemm(self.act(self.norm(x)), self.index_long, self.conv.weight, self.groups)


class CompactSFR(CompactConv1x1):
    """Condensed SFR: BN(k) -> act -> grouped 1x1 conv -> scatter-add into ``x``.

    ``forward(x, h)`` returns the reactivated ``x`` (out of place, autograd-safe), as
    :class:`~cdnv2.layers.SparseFeatureReactivation` does. Produced channel ``r`` is
    added to channel ``index[r]`` of ``x``; channels picked by several groups get the
    sum. The same module serves inference and training (BN already sees all of h).
    """

    prunes_inputs = False
    kept_name = "produced"

    @property
    def produced(self) -> int:
        return self.kept

    @staticmethod
    def gather_weight(weight: torch.Tensor, kept: torch.Tensor, groups: int) -> torch.Tensor:
        return gather_sfr_weight(weight, kept, groups)

    @classmethod
    def from_masked(cls, masked: SparseFeatureReactivation, *, share_norm: bool = False) -> "CompactSFR":
        if masked.conv.bias is not None:
            raise ValueError("CompactSFR: an SFR conv with a bias has no compact form")
        return super().from_masked(masked, share_norm=share_norm)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return sfr_gemm_add(x, self.act(self.norm(h)), self.index_long, self.conv.weight, self.groups)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent (c, k) routing-free dense weight (the masked layer's W * M)."""
        g, k, c = self.groups, self.in_channels, self.out_channels
        w = self.conv.weight.reshape(g, self.produced // g, k // g)
        dense = w.new_zeros(c, k // g, g)  # [target, j, g] = input channel j*G+g
        rows = self.index_long.view(g, -1)
        for gi in range(g):  # a group picks each target at most once: no collisions
            dense[rows[gi], :, gi] = w[gi]
        return dense.reshape(c, k)


class CompactLinear(CompactIndexed):
    """Condensed classifier: ``linear(x[:, index])`` (inference and training)."""

    def __init__(self, in_features: int, out_features: int, *, condense_factor: int):
        super().__init__()
        check_condense_sizes(type(self).__name__, out_features, in_features, 1, condense_factor)
        self.in_features, self.out_features, self.condense_factor = in_features, out_features, condense_factor
        self.kept = in_features // condense_factor
        self.linear = nn.Linear(self.kept, out_features)
        self._register_index(self.kept, in_features)

    @classmethod
    def empty_like(cls, masked: LearnedLinear) -> "CompactLinear":
        return cls(masked.in_channels, masked.out_channels, condense_factor=masked.condense_factor)

    @classmethod
    def from_masked(cls, masked: LearnedLinear, *, share_bias: bool = False) -> "CompactLinear":
        _require_final(masked)
        new = cls.empty_like(masked).to(masked.conv.weight)
        kept = masked.kept_indices()
        new.set_index(kept.flatten())
        with torch.no_grad():
            new.linear.weight.copy_(gather_linear_weight(masked.conv.weight, kept))
            if share_bias:
                new.linear.bias = masked.conv.bias
            else:
                new.linear.bias.copy_(masked.conv.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(1, self.index_long))

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        return 0.0, float(self.kept)  # the gather; the linear is a child module

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, condense_factor={self.condense_factor}"


__all__ = ["CompactConv1x1", "CompactIndexed", "CompactLGC", "CompactLinear", "CompactSFR",
           "CompactTrainLGC", "copy_bn"]
