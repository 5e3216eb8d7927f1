"""The compiled inference path: a dense block as one static graph (torch.compile / export).

The eager fused path (:mod:`cdnv2.compact.fused_run`) decides per call (plans rebuilt
when weights change, a per-thread workspace, kernel choices by image size); none of
that can be traced. This path makes every decision once:

- the folds (:func:`~cdnv2.compact.fold.fold_layer`) are stored on each
  :class:`~cdnv2.compact.CompactDenseLayer` as non-persistent buffers (``static_*``,
  :func:`register_static_buffers`), refreshed by :func:`refresh_static` whenever the
  layer is put in eval mode or loads a state dict: ``.to()`` moves and casts them, the
  state dict does not carry them;
- the block buffer layout follows from the module shapes: the block input and every
  layer's ``h`` go into one (B, C_out, H, W) tensor stored channel-major (C, B, H, W),
  each layer reads its prefix;
- the forward reads nothing from the host and has no data-dependent branch, so
  ``torch.compile(model, fullgraph=True)`` and ``torch.export.export`` (batch dynamic)
  trace it whole.

Per layer, in the terms of the generated code: the LGC's gather, input BN and
activation are one pointwise kernel writing the GEMM input group-major (G, m, B*HW),
only over the channels the layer reads; one batched GEMM per group; the bias, the 3x3
unit's activation and the shuffle one pointwise kernel writing the 3x3 conv's input;
the 3x3 conv; ``h`` copied into its slice of the block buffer (no concatenation of the
prefix); the SFR as its BN + activation (pointwise), one batched GEMM and an
``index_add`` of the produced channels only into the prefix, in place.

Narrow layers take the *pointwise form* instead (:func:`pointwise_forms`): where a group
reads at most :data:`POINTWISE_MAX_READS` channels, its 1x1 conv is written as that many
multiply-adds, which Inductor fuses with the gather, the BNs and the activations into
one loop vectorised over the pixels of the channel-major block buffer (no GEMM call, no
materialised gather); where the 3x3 conv's groups are at most
:data:`POINTWISE_MAX_3X3_INPUTS` channels wide, the LGC writes its output zero-padded and
the 3x3 conv is 9 x that many shifted multiply-adds (oneDNN runs such convs far below
its speed: cdnv2_a's first block, 112x112, went from 149 to ~50 ms at batch 32). Wider
layers keep the GEMM and oneDNN forms (slower pointwise; numbers at the constants).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.index_kernels import group_major
from .fold import NotFoldable, fold_layer

if TYPE_CHECKING:
    from .dense import CompactDenseLayer

__all__ = ["POINTWISE_MAX_3X3_INPUTS", "POINTWISE_MAX_READS", "STATIC_BUFFERS", "pointwise_forms",
           "refresh_static", "register_static_buffers", "run_block_static"]

# Per-group widths up to which a grouped conv is unrolled into multiply-adds that Inductor
# fuses. Measured on cdnv2_a at batch 32, one thread, whole model (ms per call, median):
# (8, 4) 422, (8, 8) 383-392, (12, 8) 452, (16, 4) 495: wider sums lose to the GEMM.
POINTWISE_MAX_READS = 8
POINTWISE_MAX_3X3_INPUTS = 8

STATIC_BUFFERS = ("static_pre_scale", "static_pre_shift", "static_weight", "static_bias",
                  "static_sfr_scale", "static_sfr_shift", "static_sfr_weight")


def register_static_buffers(layer: "CompactDenseLayer") -> None:
    """Register the layer's ``static_*`` buffers (shapes only; :func:`refresh_static` fills them)."""
    lgc, sfr = layer.conv_1, layer.sfr
    w = lgc.conv.weight
    g, n, m = lgc.groups, lgc.out_channels // lgc.groups, lgc.selected // lgc.groups
    shapes = {"static_pre_scale": (lgc.selected, 1), "static_pre_shift": (lgc.selected, 1),
              "static_weight": (g, n, m), "static_bias": (g, n, 1)}
    if sfr is not None:
        k, gs = sfr.in_channels, sfr.groups
        shapes.update(static_sfr_scale=(gs, k // gs, 1), static_sfr_shift=(gs, k // gs, 1),
                      static_sfr_weight=(gs, sfr.produced // gs, k // gs))
    for name in STATIC_BUFFERS:
        shape = shapes.get(name)
        layer.register_buffer(name, None if shape is None else w.new_zeros(shape), persistent=False)


@torch.no_grad()
def refresh_static(layer: "CompactDenseLayer") -> bool:
    """Fold the layer's current weights into its ``static_*`` buffers; False (buffers left
    as they were) when the layer does not fold, e.g. a BN in training mode."""
    try:
        f = fold_layer(layer)
    except NotFoldable:
        return False
    layer.static_pre_scale.copy_(f.pre_scale[:, None])
    layer.static_pre_shift.copy_(f.pre_shift[:, None])
    layer.static_weight.copy_(f.weight)
    layer.static_bias.copy_(f.bias[..., None])
    if f.sfr is not None:
        gs = f.sfr.groups
        k = f.sfr.scale.numel()
        # the SFR's input channel j*G+g is row j of group g (the grouped conv's order)
        layer.static_sfr_scale.copy_(f.sfr.scale.view(k // gs, gs).t()[..., None])
        layer.static_sfr_shift.copy_(f.sfr.shift.view(k // gs, gs).t()[..., None])
        layer.static_sfr_weight.copy_(f.sfr.weight)
    return True


def _act(kind: str, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return F.relu(t)
    if kind == "hswish":
        return F.hardswish(t)
    if kind == "identity":
        return t
    return module(t)


def pointwise_forms(layer: "CompactDenseLayer") -> tuple[bool, bool, bool]:
    """Which of the layer's LGC 1x1, 3x3 and SFR 1x1 take the pointwise form (module
    shapes only, so the choice is fixed per model). The 3x3 and the SFR need the LGC's."""
    m = layer.conv_1.selected // layer.conv_1.groups
    conv3 = layer.conv_2.conv
    lgc = m <= POINTWISE_MAX_READS
    conv = lgc and conv3.in_channels // conv3.groups <= POINTWISE_MAX_3X3_INPUTS
    sfr = layer.sfr
    return lgc, conv, lgc and sfr is not None and sfr.in_channels // sfr.groups <= POINTWISE_MAX_READS


def _grouped_sum(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A grouped 1x1 conv as explicit multiply-adds: a (B, G, m, H, W), weight (G, n, m)
    -> (B, G, n, H, W). Inductor fuses them (and a's producer) into one pointwise loop."""
    g, n, m = weight.shape
    out = None
    for j in range(m):
        term = a[:, :, None, j] * weight[:, :, j].reshape(1, g, n, 1, 1)
        out = term if out is None else out + term
    return out


def _lgc_pointwise(layer: "CompactDenseLayer", buf: torch.Tensor, padded: bool) -> torch.Tensor:
    """The 3x3 conv's input (interleaved channel order), zero-padded by one pixel
    when ``padded``: computed on the padded grid (from zero-padded inputs), border zeroed,
    so the 3x3 conv reads it with no bounds checks."""
    b, _, hgt, wid = buf.shape
    lgc, unit = layer.conv_1, layer.conv_2
    g, n, m = layer.static_weight.shape
    sel = buf.index_select(1, lgc.index_long)
    if padded:
        sel = F.pad(sel, (1, 1, 1, 1))
    a = _act(layer.act_kinds[0], lgc.act, sel * layer.static_pre_scale.view(1, -1, 1, 1)
             + layer.static_pre_shift.view(1, -1, 1, 1))
    y = _grouped_sum(a.reshape(b, g, m, *a.shape[-2:]), layer.static_weight)
    y = _act(layer.act_kinds[1], unit.act, y + layer.static_bias.view(1, g, n, 1, 1))
    y = y.transpose(1, 2).reshape(b, n * g, *a.shape[-2:])  # shuffle: [g, d] -> channel d*G+g
    if padded:
        rows = torch.arange(hgt + 2, device=y.device)
        cols = torch.arange(wid + 2, device=y.device)
        inside = ((rows > 0) & (rows <= hgt))[:, None] & ((cols > 0) & (cols <= wid))[None, :]
        y = torch.where(inside, y, 0.0)
    return y


def _conv3_pointwise(yp: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The grouped 3x3 conv (stride 1) of the zero-padded ``yp`` as 9 x (inputs per
    group) shifted multiply-adds, fused by Inductor into one loop over the pixels."""
    b, c3, hp, wp = yp.shape
    hgt, wid, g, k = hp - 2, wp - 2, conv.groups, conv.out_channels
    n3 = c3 // g
    w = conv.weight.reshape(g, k // g, n3, 9)
    out = None
    for t in range(9):
        dy, dx = divmod(t, 3)
        tap = yp[:, :, dy:dy + hgt, dx:dx + wid].reshape(b, g, n3, hgt, wid)
        for j in range(n3):
            term = tap[:, :, None, j] * w[:, :, j, t].reshape(1, g, k // g, 1, 1)
            out = term if out is None else out + term
    out = out.reshape(b, k, hgt, wid)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def _sfr_pointwise(layer: "CompactDenseLayer", h: torch.Tensor, buf: torch.Tensor) -> None:
    """buf[:, index[r]] += the SFR's produced channel r, the 1x1 as multiply-adds."""
    sfr = layer.sfr
    b, k, hgt, wid = h.shape
    gs = sfr.groups
    hg = h.view(b, k // gs, gs, hgt, wid).transpose(1, 2)  # SFR input j*G+g is row j of group g
    a3 = _act(layer.act_kinds[2], sfr.act, hg * layer.static_sfr_scale.view(1, gs, k // gs, 1, 1)
              + layer.static_sfr_shift.view(1, gs, k // gs, 1, 1))
    s = _grouped_sum(a3, layer.static_sfr_weight).reshape(b, sfr.produced, hgt, wid)
    buf.index_add_(1, sfr.index_long, s)


def _lgc_into_conv_input(layer: "CompactDenseLayer", buf: torch.Tensor) -> torch.Tensor:
    """LGC with the 3x3 unit's BN folded: the 3x3 conv's input, interleaved channel order."""
    b, _, hgt, wid = buf.shape
    hw = hgt * wid
    lgc, unit = layer.conv_1, layer.conv_2
    g, n, m = layer.static_weight.shape
    kinds = layer.act_kinds
    if group_major(hw):  # small images: one GEMM per group over all images
        # gather + BN + act over the read channels only, group-major (G, m, B*HW)
        sel = buf.index_select(1, lgc.index_long).transpose(0, 1).reshape(g * m, b, hw)
        a = _act(kinds[0], lgc.act, sel * layer.static_pre_scale[..., None] + layer.static_pre_shift[..., None])
        y = _act(kinds[1], unit.act, torch.bmm(layer.static_weight, a.reshape(g, m, b * hw)) + layer.static_bias)
        # shuffle: grouped [g, d] -> channel d*G+g, written once channels-last (the layout
        # oneDNN's conv wants; NCHW here would cost Inductor a second copy)
        return y.view(g, n, b, hgt, wid).permute(2, 3, 4, 1, 0).reshape(b, hgt, wid, -1).permute(0, 3, 1, 2)
    # large images: per-image GEMMs, no transposition of batch-sized tensors
    sel = buf.index_select(1, lgc.index_long).reshape(b, g * m, hw)
    a = _act(kinds[0], lgc.act, sel * layer.static_pre_scale + layer.static_pre_shift)
    y = _act(kinds[1], unit.act, torch.matmul(layer.static_weight, a.view(b, g, m, hw)) + layer.static_bias)
    return y.view(b, g, n, hgt, wid).permute(0, 3, 4, 2, 1).reshape(b, hgt, wid, -1).permute(0, 3, 1, 2)


def _sfr_into(layer: "CompactDenseLayer", h: torch.Tensor, buf: torch.Tensor) -> None:
    """buf[:, index[r]] += the SFR's produced channel r (in place; duplicates sum)."""
    sfr = layer.sfr
    b, k, hgt, wid = h.shape
    hw, gs = hgt * wid, sfr.groups
    if group_major(hw):
        hg = h.reshape(b, k // gs, gs, hw).permute(2, 1, 0, 3)  # (G, k/G, B, HW)
        a3 = _act(layer.act_kinds[2], sfr.act, hg * layer.static_sfr_scale[..., None]
                  + layer.static_sfr_shift[..., None])
        s = torch.bmm(layer.static_sfr_weight, a3.reshape(gs, k // gs, b * hw))  # (G, c'/G, B*HW)
        s = s.view(sfr.produced, b, hgt, wid).transpose(0, 1)
    else:
        hg = h.reshape(b, k // gs, gs, hw).transpose(1, 2)  # (B, G, k/G, HW)
        a3 = _act(layer.act_kinds[2], sfr.act, hg * layer.static_sfr_scale + layer.static_sfr_shift)
        s = torch.matmul(layer.static_sfr_weight, a3).reshape(b, sfr.produced, hgt, wid)
    buf.index_add_(1, sfr.index_long, s)  # produced channel r -> channel index[r] (< c)


def _layer_into(layer: "CompactDenseLayer", buf: torch.Tensor, c: int) -> None:
    """Run ``layer`` on buf[:, :c]: h goes to buf[:, c:c+k], buf[:, :c] is reactivated."""
    conv3 = layer.conv_2.conv
    pw_lgc, pw_conv, pw_sfr = pointwise_forms(layer)
    y = _lgc_pointwise(layer, buf, padded=pw_conv) if pw_lgc else _lgc_into_conv_input(layer, buf)
    if pw_conv:
        h = layer.se(_conv3_pointwise(y, conv3))
    else:
        h = layer.se(F.conv2d(y, conv3.weight, conv3.bias, 1, 1, 1, conv3.groups))
    if pw_sfr:
        _sfr_pointwise(layer, h, buf)
    elif layer.sfr is not None:
        _sfr_into(layer, h, buf)
    # index_copy_, not a slice assignment: Inductor re-inplaces it into the block buffer,
    # while a slice_scatter after the index_add_ above becomes a copy of the whole buffer
    buf.index_copy_(1, torch.arange(c, c + h.shape[1], device=buf.device), h)


def run_block_static(layers: list, x: torch.Tensor) -> torch.Tensor:
    """A dense block on ``x`` (B, C, H, W) -> its block buffer (B, C + sum of growths, H, W)."""
    b, c, hgt, wid = x.shape
    width = c + sum(layer.growth for layer in layers)
    # channel-major (C, B, H, W) storage: a channel of all images is one contiguous run, so
    # gathers, scatter-adds and the pointwise forms vectorise over it. A plain (B, C, H, W)
    # buffer is turned channels-last by Inductor's layout optimisation, which leaves every
    # gathered element a scalar strided load (cdnv2_a, batch 32: 619 -> 473 ms per call).
    buf = x.new_empty(width, b, hgt, wid).permute(1, 0, 2, 3)
    buf[:, :c] = x
    for layer in layers:
        _layer_into(layer, buf, c)
        c += layer.growth
    return buf
