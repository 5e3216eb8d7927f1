"""Execution of the fused inference path (eval + no_grad only; plans: fused_plan.py).

Every dense layer of a block writes into one block buffer (B, c_out, H, W): it reads
x = buf[:, :c], adds its SFR output into that slice in place and writes h into
buf[:, c:c+k], so there are no concatenation copies. Scratch tensors come from a
per-thread workspace kept between calls: at batch 32 the early activations exceed
glibc's mmap threshold, and a fresh allocation costs page faults worth ~10 passes.
The gather reads rows of the (B * width, H * W) buffer (a fast row copy), and the
transition's 2x2 average pool is two strided adds into the next block's buffer.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.index_kernels import group_major
from .fused_plan import Plan, conv3_mode, plan_for

if TYPE_CHECKING:
    from .dense import CompactDenseLayer

# Depthwise form of the 3x3 conv: images per call so that its output stays about this big.
_DW_CHUNK_BYTES = 2 << 20
_THREAD = threading.local()

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
    scratch = getattr(_THREAD, "workspace", None)
    if scratch is None:
        scratch = _THREAD.workspace = _Workspace()
    return scratch


def release_workspace() -> None:
    """Free the calling thread's scratch memory of the fused path."""
    _THREAD.workspace = None


def _reserve_for(layers: list, batch: int, pixels: int, like: torch.Tensor, scratch: _Workspace) -> None:
    need = {"sel": 0, "y": 0, "y2": 0, "a3": 0, "s": 0}
    for layer in layers:
        lgc = layer.conv_1
        need["sel"] = max(need["sel"], lgc.selected, lgc.in_channels)
        need["y"] = max(need["y"], lgc.out_channels)
        need["y2"] = max(need["y2"], lgc.out_channels)
        if layer.sfr is not None:
            need["a3"] = max(need["a3"], layer.sfr.in_channels)
            need["s"] = max(need["s"], layer.sfr.produced)
    scratch.reserve(like, {k: v * batch * pixels for k, v in need.items() if v})


def _clamp_(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor | None) -> None:
    t.clamp_(min=lo)  # one bound per pass: two tensor bounds at once are ~5x slower
    if hi is not None:
        t.clamp_(max=hi)


def _layer_into(layer: "CompactDenseLayer", plan: Plan, buf: torch.Tensor, c: int, scratch: _Workspace) -> None:
    """Run ``layer`` on buf[:, :c]: h goes to buf[:, c:c+k], buf[:, :c] is reactivated."""
    b, _, hgt, wid = buf.shape
    hw = hgt * wid
    lgc = layer.conv_1
    y2 = scratch.get("y2", (b, lgc.out_channels, hw))
    if plan.lgc_mode == "dense":
        _lgc_dense_into(layer, plan, buf[:, :c].flatten(2), y2, scratch)
    else:
        _lgc_gathered_into(layer, plan, buf, y2, scratch)
    hbuf = buf[:, c:c + layer.conv_2.conv.out_channels]
    _conv3_into(layer, plan, y2.view(b, lgc.out_channels, hgt, wid), hbuf)
    if layer.sfr is not None:
        _sfr_into(layer.sfr, plan, hbuf, buf, c, scratch)


# ---- LGC with the 3x3 unit's BN folded -> y2 = act2(BN2(lgc(x))) (minus the bias when it
# is pushed through the 3x3 conv), interleaved channel order
def _lgc_dense_into(layer: "CompactDenseLayer", plan: Plan, xv: torch.Tensor, y2: torch.Tensor,
                    scratch: _Workspace) -> None:
    """The LGC as one dense GEMM over all ``c`` input channels ``xv`` (B, c, HW)."""
    a = scratch.get("sel", xv.shape)
    if plan.act1 == "relu":
        torch.clamp(xv, min=plan.lo, out=a)
        if plan.hi is not None:
            a.clamp_(max=plan.hi)
    else:
        torch.addcmul(plan.t1, xv, plan.s1, out=a)
        _apply_act_(plan.act1, layer.conv_1.act, a)
    torch.matmul(plan.w1, a, out=y2)
    if plan.bias_through:
        y2.clamp_(min=plan.nb1)
    else:
        y2.add_(plan.b1)
        _apply_act_(plan.act2, layer.conv_2.act, y2)


def _lgc_gathered_into(layer: "CompactDenseLayer", plan: Plan, buf: torch.Tensor, y2: torch.Tensor,
                       scratch: _Workspace) -> None:
    """The LGC on its selected rows of ``buf``, one GEMM per group; small images use
    group-major rows (one GEMM per group over all images)."""
    b, width, hgt, wid = buf.shape
    hw = hgt * wid
    lgc = layer.conv_1
    g, selected = lgc.groups, lgc.selected
    n, m = lgc.out_channels // g, selected // g
    by_group = group_major(hw)
    rows = plan.gather_rows(b, width, by_group)
    if by_group:
        sel = scratch.get("sel", (selected, b, hw))
        bn_shape = (selected, 1, 1)
    else:
        sel = scratch.get("sel", (b, selected, hw))
        bn_shape = (selected, 1)
    torch.index_select(buf.view(b * width, hw), 0, rows, out=sel.view(b * selected, hw))
    if plan.act1 == "relu":
        _clamp_(sel, plan.lo.view(bn_shape), None if plan.hi is None else plan.hi.view(bn_shape))
    else:
        torch.addcmul(plan.t1.view(bn_shape), sel, plan.s1.view(bn_shape), out=sel)
        _apply_act_(plan.act1, lgc.act, sel)
    if by_group:
        y = scratch.get("y", (g, n, b, hw))
        torch.bmm(plan.w1, sel.view(g, m, b * hw), out=y.view(g, n, b * hw))
        y_shuffled = y.permute(2, 1, 0, 3)  # (B, n, G, HW): channel d*G+g
        bias = plan.b1.view(g, n, 1, 1)
    else:
        y = scratch.get("y", (b, g, n, hw))
        torch.matmul(plan.w1, sel.view(b, g, m, hw), out=y)
        y_shuffled = y.transpose(1, 2)
        bias = plan.b1
    y2v = y2.view(b, n, g, hw)
    if plan.bias_through:
        torch.clamp(y_shuffled, min=plan.nb1, out=y2v)
    else:
        y.add_(bias)
        _act_into(plan.act2, layer.conv_2.act, y_shuffled, y2v)


def _conv3_into(layer: "CompactDenseLayer", plan: Plan, y2: torch.Tensor, hbuf: torch.Tensor) -> None:
    """The 3x3 grouped conv (+ SE) of ``y2`` (B, o, H, W) -> h, written into ``hbuf``."""
    conv3 = layer.conv_2.conv
    _, _, hgt, wid = y2.shape
    if conv3_mode(layer, plan, hgt * wid) == "depthwise":
        _conv3_depthwise_into(y2, plan.w_dw, conv3.groups, hbuf)
        if plan.bias_through:
            hbuf.add_(plan.bias_map(conv3, hgt, wid))
        else:
            if conv3.bias is not None:
                hbuf.add_(conv3.bias.view(1, -1, 1, 1))
            if not isinstance(layer.se, nn.Identity):
                hbuf.copy_(layer.se(hbuf))
    else:
        h = F.conv2d(y2, conv3.weight, None if plan.bias_through else conv3.bias, 1, 1, 1, conv3.groups)
        if plan.bias_through:
            torch.add(h, plan.bias_map(conv3, hgt, wid), out=hbuf)
        else:
            hbuf.copy_(layer.se(h))


def _sfr_into(sfr: nn.Module, plan: Plan, hbuf: torch.Tensor, buf: torch.Tensor, c: int,
              scratch: _Workspace) -> None:
    """SFR: buf[:, :c] += scatter(conv(act(BN3(h)))), h = ``hbuf``."""
    b, width, hgt, wid = buf.shape
    hw = hgt * wid
    k = hbuf.shape[1]
    xv = buf[:, :c].flatten(2)
    hv = hbuf.flatten(2)
    if plan.sfr_mode == "dense":
        a3 = scratch.get("a3", (b, k, hw))
        torch.addcmul(plan.t3, hv, plan.s3, out=a3)
        _apply_act_(plan.act3, sfr.act, a3)
        xv.baddbmm_(plan.w_sfr.expand(b, c, k), a3)
        return
    gs = sfr.groups
    a3 = scratch.get("a3", (b, gs, k // gs, hw))
    torch.addcmul(plan.t3, hv.view(b, k // gs, gs, hw).transpose(1, 2), plan.s3, out=a3)
    _apply_act_(plan.act3, sfr.act, a3)
    s = scratch.get("s", (b, gs, sfr.produced // gs, hw))
    torch.matmul(plan.w_sfr, a3, out=s)
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


def is_pool2(m: nn.Module) -> bool:
    """A plain 2x2 / stride-2 average pool (what the dense-net transitions are)."""
    two = (2, (2, 2))
    return (isinstance(m, nn.AvgPool2d) and m.kernel_size in two and m.stride in two
            and m.padding in (0, (0, 0)) and not m.ceil_mode and m.divisor_override is None)


def _pool2_into(x: torch.Tensor, out: torch.Tensor, scratch: _Workspace) -> None:
    """out = avg_pool2d(x, 2): two strided adds (avg_pool2d itself is ~5x slower here)."""
    b, c, hgt, wid = x.shape
    h2, w2 = hgt // 2, wid // 2
    x = x[:, :, :2 * h2, :2 * w2]
    scratch.reserve(x, {"pool": b * c * h2 * 2 * w2})
    rows = scratch.get("pool", (b, c, h2, 2 * w2))
    torch.add(x[:, :, 0::2], x[:, :, 1::2], out=rows)
    torch.add(rows[..., 0::2], rows[..., 1::2], out=out)
    out.mul_(0.25)


def run_block(layers: list, x: torch.Tensor, *, pool: bool = False, buffer_name: str | None = None):
    """Fused block: input (optionally 2x2-pooled first) -> block buffer. None if not foldable."""
    plans = [plan_for(layer) for layer in layers]
    if any(p is None for p in plans) or x.dim() != 4 or x.dtype != layers[0].conv_1.conv.weight.dtype:
        return None
    b, c, hgt, wid = x.shape
    if pool:
        hgt, wid = hgt // 2, wid // 2
    width = c + sum(layer.growth for layer in layers)
    scratch = _workspace()
    if buffer_name is not None:
        scratch.reserve(x, {buffer_name: b * width * hgt * wid})
        buf = scratch.get(buffer_name, (b, width, hgt, wid))
    else:
        buf = x.new_empty(b, width, hgt, wid)
    if pool:
        _pool2_into(x, buf[:, :c], scratch)
    else:
        buf[:, :c].copy_(x)
    _reserve_for(layers, b, hgt * wid, buf, scratch)
    for layer, plan in zip(layers, plans):
        _layer_into(layer, plan, buf, c, scratch)
        c += layer.growth
    return buf


