"""The fold of a dense layer, written once: what every inference form derives from it.

A CondenseNet(V2) dense layer is LGC (BN -> act -> grouped 1x1 conv over the kept
inputs -> shuffle) -> 3x3 unit (BN -> act -> grouped 3x3 conv) -> [SE] -> [SFR]. The
3x3 unit's BN is affine right after the LGC conv, so it folds into the LGC weight (scale)
and a bias (shift); the LGC's own input BN cannot fold (its input is a concatenation)
and stays a per-channel ``scale * x + shift`` on the channels the LGC reads.

- :class:`DenseLayerLike` declares the interface: ``conv_1`` (an LGC, masked or compact),
  ``conv_2`` (:class:`~cdnv2.layers.PreActConv`), ``se``, ``sfr`` (or None).
  :func:`is_dense_layer` / :func:`dense_blocks` find such layers; nothing else reads
  those child names to recognise one.
- :func:`fold_layer` returns a :class:`FoldedLayer` (float64): the pieces the fused
  inference path (``fused_plan``), the compiled path (``static_run``) and the deployment
  graph (``deploy/graph.py``) are built from.
- :func:`masked_layer_state` is the inverse: a compact LGC / SFR / classifier as the
  masked layer's state (dense weight with zeros where pruned, mask, final stage), what
  ``init=`` loads into a freshly built masked model.

All folds are exact up to float rounding; the BNs must be in eval mode with running
statistics (:class:`NotFoldable` otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..layers import CompactLGC, CompactLinear, CompactSFR, CompactTrainLGC, LearnedGroupConv, LearnedLinear, PreActConv
from ..layers.conv_unit import bn_affine

__all__ = [
    "ACT_KINDS",
    "DenseLayerLike",
    "FoldedLayer",
    "FoldedSFR",
    "NotFoldable",
    "act_kind",
    "dense_blocks",
    "dense_layers",
    "expand_lgc_weight",
    "fold_bn",
    "fold_layer",
    "inference_lgc",
    "inference_sfr",
    "is_compact_dense_layer",
    "is_dense_layer",
    "masked_layer_state",
]


class NotFoldable(ValueError):
    """A layer whose BN is not a fixed affine map (training mode, no running statistics)
    or whose 3x3 unit is not the stride-1 padded conv of a dense layer."""


@runtime_checkable
class DenseLayerLike(Protocol):
    """A CondenseNet(V2) dense layer, masked (``models.DenseLayer``) or compact
    (:class:`~cdnv2.compact.CompactDenseLayer`): ``concat([sfr(x, h) or x, h])`` with
    ``h = se(conv_2(conv_1(x)))``."""

    conv_1: nn.Module  # LearnedGroupConv | CompactTrainLGC | CompactLGC
    conv_2: PreActConv
    se: nn.Module  # SqueezeExcite or Identity
    sfr: nn.Module | None  # SparseFeatureReactivation | CompactSFR | None


_LGC_TYPES = (LearnedGroupConv, CompactTrainLGC, CompactLGC)


def is_dense_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a dense layer (:class:`DenseLayerLike` with an LGC ``conv_1``)."""
    lgc = getattr(m, "conv_1", None)
    return (isinstance(m, DenseLayerLike) and isinstance(lgc, _LGC_TYPES) and not isinstance(lgc, LearnedLinear)
            and isinstance(m.conv_2, PreActConv))


def is_compact_dense_layer(m: nn.Module) -> bool:
    """A dense layer in the inference form (its LGC a :class:`CompactLGC`)."""
    return is_dense_layer(m) and isinstance(m.conv_1, CompactLGC)


def dense_layers(model: nn.Module, *, compact: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every dense layer of ``model`` (only compact ones with ``compact``)."""
    test = is_compact_dense_layer if compact else is_dense_layer
    return [(name, m) for name, m in model.named_modules() if test(m)]


def dense_blocks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, layers) of every dense block: a module whose children are all dense layers."""
    blocks = []
    for name, m in model.named_modules():
        children = list(m.children())
        if children and all(is_dense_layer(c) for c in children):
            blocks.append((name, children))
    return blocks


ACT_KINDS = ("relu", "hswish", "identity")


def act_kind(act: nn.Module) -> str:
    """The activation as a name the folded forms implement (``ACT_KINDS``), or
    ``"module"``: something else, to be run as the module itself."""
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.Hardswish):
        return "hswish"
    if isinstance(act, nn.Identity):
        return "identity"
    return "module"


def fold_bn(bn: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN (or Identity) as float64 ``(scale, shift)``; :class:`NotFoldable` if none."""
    affine = bn_affine(bn, channels)
    if affine is None:
        raise NotFoldable(f"{type(bn).__name__} is not an eval-mode BatchNorm with running statistics")
    return affine


def expand_lgc_weight(weight: torch.Tensor, index: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Grouped LGC weight (G, n, m) ([g, d] is output d*G+g; group g reads inputs
    index[g*m:(g+1)*m]) -> the dense (O, C) weight with zeros where pruned, rows in the
    interleaved output order. A repeated input of a group would sum."""
    g, n, m = weight.shape
    dense = weight.new_zeros(n, g, in_channels)
    for gi in range(g):
        dense[:, gi].index_add_(1, index[gi * m:(gi + 1) * m], weight[gi])
    return dense.reshape(g * n, in_channels)


def grouped_to_interleaved_perm(channels: int, groups: int, device=None) -> torch.Tensor:
    """p with ``grouped[j] = interleaved[p[j]]``: grouped position g*n+d holds output d*G+g."""
    return torch.arange(channels, device=device).view(channels // groups, groups).t().reshape(-1)


@dataclass(frozen=True)
class FoldedSFR:
    """An SFR (float64): ``x[:, index[r]] += (weight @ act(scale * h + shift))[r]``."""

    scale: torch.Tensor  # (k,) BN of h
    shift: torch.Tensor
    act: str
    groups: int  # input groups: inputs j*G+g belong to group g
    weight: torch.Tensor  # (G, c'/G, k/G) grouped: group g's produced channels from its inputs
    index: torch.Tensor  # (c',) long: target channel of each produced channel
    dense_weight: torch.Tensor  # (c, k): the same map routing-free (duplicates summed)


@dataclass(frozen=True)
class FoldedLayer:
    """One dense layer's folded pieces (float64, on the weights' device).

    ``y = mid_act(weight @ pre_act(pre_scale * x[:, index] + pre_shift) + bias)`` in the
    grouped order, shuffled to interleaved order, is the 3x3 conv's input.
    """

    index: torch.Tensor  # (S,) long: the LGC's selected inputs, group by group
    in_channels: int
    pre_scale: torch.Tensor  # (S,) the LGC input BN on the selected channels
    pre_shift: torch.Tensor
    pre_act: str
    weight: torch.Tensor  # (G, n, m) LGC weight * the 3x3 unit's BN scale; [g, d] = output d*G+g
    bias: torch.Tensor  # (G, n) the 3x3 unit's BN shift, same order
    mid_act: str  # the 3x3 unit's activation
    conv3: nn.Conv2d  # the 3x3 conv itself (stride 1, padding 1)
    se: nn.Module
    sfr: FoldedSFR | None

    @property
    def groups(self) -> int:
        return self.weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] * self.weight.shape[1]

    def dense_weight(self) -> torch.Tensor:
        """(O, C): the LGC as one 1x1 conv over all inputs, interleaved rows (no shuffle)."""
        return expand_lgc_weight(self.weight, self.index, self.in_channels)

    def dense_bias(self) -> torch.Tensor:
        """(O,) ``bias`` in the interleaved order."""
        return self.bias.t().reshape(-1)

    def dense_pre(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The input BN over all C inputs (identity where unread), or None when two groups
        read the same channel with different statistics (no per-input form then)."""
        s = self.pre_scale.new_ones(self.in_channels).index_copy(0, self.index, self.pre_scale)
        t = self.pre_shift.new_zeros(self.in_channels).index_copy(0, self.index, self.pre_shift)
        if not (torch.equal(s[self.index], self.pre_scale) and torch.equal(t[self.index], self.pre_shift)):
            return None
        return s, t


def inference_lgc(m: nn.Module) -> CompactLGC:
    """The inference form of any LGC form (a fully condensed masked one, compact-training, compact)."""
    if isinstance(m, CompactLGC):
        return m
    if isinstance(m, CompactTrainLGC):  # BN on all inputs -> BN on the selected ones
        return CompactLGC.from_training(m)
    return CompactLGC.from_masked(m)


def inference_sfr(m: nn.Module | None) -> CompactSFR | None:
    """The inference form of any SFR form (None stays None)."""
    if m is None or isinstance(m, CompactSFR):
        return m
    return CompactSFR.from_masked(m)


def _lgc_pieces(lgc: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, BN scale and shift on the selected channels, grouped conv weight) of any LGC form."""
    if isinstance(lgc, CompactLGC):
        s, t = fold_bn(lgc.norm, lgc.selected)
        return lgc.index_long, s, t, lgc.conv.weight
    if isinstance(lgc, CompactTrainLGC):
        s, t = fold_bn(lgc.norm, lgc.in_channels)
        idx = lgc.index_long
        return idx, s[idx], t[idx], lgc.conv.weight
    compact = CompactLGC.from_masked(lgc)  # a fully condensed masked LGC
    return _lgc_pieces(compact)


def _fold_sfr(sfr: nn.Module) -> FoldedSFR:
    sfr = inference_sfr(sfr)
    s, t = fold_bn(sfr.norm, sfr.in_channels)
    k, g = sfr.in_channels, sfr.groups
    return FoldedSFR(
        scale=s, shift=t, act=act_kind(sfr.act), groups=g,
        weight=sfr.conv.weight.detach().double().reshape(g, sfr.produced // g, k // g),
        index=sfr.index_long, dense_weight=sfr.dense_weight().detach().double(),
    )


@torch.no_grad()
def fold_layer(layer: DenseLayerLike) -> FoldedLayer:
    """The folded pieces of a dense layer (compact, compact-training or fully condensed
    masked); :class:`NotFoldable` when a BN is not a fixed map or the 3x3 unit is not
    the stride-1, padding-1 conv the folded forms assume."""
    lgc, unit = layer.conv_1, layer.conv_2
    conv3 = unit.conv
    if conv3.stride != (1, 1) or conv3.padding != (1, 1) or conv3.dilation != (1, 1):
        raise NotFoldable("the 3x3 unit must have stride 1, padding 1 and no dilation")
    index, s1, t1, w = _lgc_pieces(lgc)
    g, o = lgc.groups, lgc.out_channels
    n = o // g
    s2, t2 = fold_bn(unit.norm, o)
    perm = grouped_to_interleaved_perm(o, g, device=s2.device)
    w = w.detach().double().reshape(g, n, -1)
    return FoldedLayer(
        index=index, in_channels=lgc.in_channels, pre_scale=s1, pre_shift=t1, pre_act=act_kind(lgc.act),
        weight=s2[perm].view(g, n, 1) * w, bias=t2[perm].view(g, n), mid_act=act_kind(unit.act),
        conv3=conv3, se=layer.se, sfr=None if layer.sfr is None else _fold_sfr(layer.sfr),
    )


# ----------------------------------------------------------------------------- inverse
def _bn_state(norm: nn.BatchNorm2d, size: int, index: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A BN state of ``size`` channels; with ``index``, ``norm`` holds only those channels
    (the others are never read by the masked math: their weights are pruned)."""
    if index is None:
        return {k: v.clone() for k, v in norm.state_dict().items()}
    like = norm.weight.detach()
    out = {"weight": like.new_ones(size), "bias": like.new_zeros(size),
           "running_mean": like.new_zeros(size), "running_var": like.new_ones(size)}
    for k in out:
        out[k][index] = getattr(norm, k).detach()
    out["num_batches_tracked"] = norm.num_batches_tracked.clone()
    return out


def _masked_lgc_state(m: CompactLGC | CompactTrainLGC) -> dict[str, torch.Tensor]:
    g, o, i = m.groups, m.out_channels, m.in_channels
    w = m.conv.weight.detach().reshape(g, o // g, -1)
    dense = expand_lgc_weight(w, m.index_long, i)
    mask = expand_lgc_weight(torch.ones_like(w), m.index_long, i).clamp_max(1)
    norm = _bn_state(m.norm, i, m.index_long if isinstance(m, CompactLGC) else None)
    return {
        **{f"norm.{k}": v for k, v in norm.items()},
        "conv.weight": dense.reshape(o, i, 1, 1),
        "mask": mask.reshape(o, i, 1, 1),
        "stage": torch.tensor(m.condense_factor - 1),
    }


def _masked_sfr_state(m: CompactSFR) -> dict[str, torch.Tensor]:
    g, k, c = m.groups, m.in_channels, m.out_channels
    targets = m.index_long.view(g, -1)  # input group g writes channels targets[g]
    mask = m.conv.weight.new_zeros(c, k)
    for grp in range(g):
        mask[targets[grp][:, None], torch.arange(grp, k, g)] = 1.0
    return {
        **{f"norm.{n}": v for n, v in _bn_state(m.norm, k, None).items()},
        "conv.weight": m.dense_weight().detach().reshape(c, k, 1, 1),
        "mask": mask.reshape(c, k, 1, 1),
        "stage": torch.tensor(m.condense_factor - 1),
    }


def _masked_linear_state(m: CompactLinear) -> dict[str, torch.Tensor]:
    idx = m.index_long
    w = m.linear.weight.detach()
    dense = w.new_zeros(m.out_features, m.in_features)
    mask = torch.zeros_like(dense)
    dense[:, idx], mask[:, idx] = w, 1.0
    return {"conv.weight": dense[:, :, None, None], "conv.bias": m.linear.bias.detach().clone(),
            "mask": mask[:, :, None, None], "stage": torch.tensor(m.condense_factor - 1)}


def masked_layer_state(m: nn.Module) -> dict[str, torch.Tensor] | None:
    """A compact LGC / SFR / classifier's state in its masked layer's layout (mask + dense
    weight with zeros where pruned, at the final stage); None for any other module."""
    if isinstance(m, (CompactLGC, CompactTrainLGC)):
        return _masked_lgc_state(m)
    if isinstance(m, CompactSFR):
        return _masked_sfr_state(m)
    if isinstance(m, CompactLinear):
        return _masked_linear_state(m)
    return None
