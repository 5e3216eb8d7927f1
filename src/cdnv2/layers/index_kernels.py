"""Index kernels of the compact layers: row gathers, grouped GEMMs, scatter-adds.

Every kernel works on the ``(B * C, H * W)`` view of an NCHW tensor: gathering or
scattering whole rows is a plain memcpy per row, while ``index_select`` along dim 1 copies
channel by channel (~7x slower on CPU). Grouped 1x1 convs are batched GEMMs: oneDNN runs
1x1 convs with a few channels per group 2-4x slower (measured, forward and backward).

The ``gather_*_weight`` functions map a masked layer's weight-shaped tensor (weight,
gradient, momentum buffer) to the compact conv weight's layout; the optimizer hand-over
of :func:`cdnv2.compact.to_compact_training` reuses them.
"""
from __future__ import annotations

import torch

# Group-major: an LGC's kept inputs are gathered with all images of a group's channels
# side by side, and each group is ONE GEMM over all images; batch-major: one GEMM per
# image and group. Both rules were measured on a 2-core x86 CPU (docs/convert.md): the
# no-grad inference path favours group-major up to 28x28; the training form (forward +
# backward, whose index_add backward follows the gather layout) favours per-image GEMMs
# from 14x14 to 56x56 and group-major for the smallest and the largest maps.
GROUP_MAJOR_MAX_PIXELS = 28 * 28
TRAIN_BATCH_MAJOR_PIXELS = (14 * 14, 56 * 56)


def group_major(pixels: int, *, training: bool = False) -> bool:
    """Whether an LGC over images of ``pixels`` pixels gathers group-major."""
    if training:
        lo, hi = TRAIN_BATCH_MAJOR_PIXELS
        return not lo <= pixels <= hi
    return pixels <= GROUP_MAJOR_MAX_PIXELS


def index_dtype(channels: int) -> torch.dtype:
    """Smallest integer type for stored indices into ``channels`` channels (artifact size)."""
    return torch.int16 if channels <= 2**15 else torch.int32


def batch_major_rows(index: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """Rows of a (B*C, H*W) view: channels ``index`` of image 0, then of image 1, ..."""
    return ((torch.arange(batch, device=index.device) * channels)[:, None] + index[None, :]).reshape(-1)


def group_major_rows(index: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """Rows of a (B*C, H*W) view: every image of channel index[0], then of index[1], ..."""
    return (index[:, None] + torch.arange(batch, device=index.device)[None, :] * channels).reshape(-1)


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` for (B, C, H, W) ``x`` as one row gather of the (B*C, H*W) view."""
    b, c, hgt, wid = x.shape
    rows = batch_major_rows(index, b, c)
    return x.reshape(b * c, hgt * wid).index_select(0, rows).view(b, -1, hgt, wid)


def grouped_conv1x1(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1x1 conv as a batched GEMM: (B, Cin, H, W) -> (B, G, Cout/G, H*W).

    Callers reshape (or shuffle) the result.
    """
    b, cin, hgt, wid = x.shape
    w = weight.reshape(groups, weight.shape[0] // groups, cin // groups)
    return torch.matmul(w, x.reshape(b, groups, cin // groups, hgt * wid))


def lgc_gemm(a: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Gather the kept inputs ``index`` of ``a`` and run the grouped 1x1 conv, shuffled.

    (B, C, H, W) -> (B, O, H, W) with output ``d * G + g`` in interleaved order; the
    gather layout follows the training rule of :func:`group_major`.
    """
    b, c, hgt, wid = a.shape
    hw, o, m = hgt * wid, weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, o // groups, m)
    if not group_major(hw, training=True):
        sel = a.reshape(b * c, hw).index_select(0, batch_major_rows(index, b, c))
        y = torch.matmul(w, sel.view(b, groups, m, hw))  # (B, G, O/G, HW)
        return y.transpose(1, 2).reshape(b, o, hgt, wid)
    sel = a.reshape(b * c, hw).index_select(0, group_major_rows(index, b, c))
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
    out = x.to(dt).reshape(b * c, hw).index_add(0, group_major_rows(index, b, c), s.view(-1, hw).to(dt))
    return out.view(b, c, hgt, wid)


# ----------------------------------------------------------------------------- weight gathers
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
