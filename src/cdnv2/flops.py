"""Cost counting: the paper's FLOPs/params rule and what actually executes (SPEC 2).

``count_cost(model)`` runs one forward pass at batch 1 with hooks and returns a
:class:`CostReport` with four totals, each with its unit:

- ``paper_flops`` / ``paper_params``: the CondenseNet papers' rule. Multiply-adds of
  convs and linears, one op per ReLU/ReLU6/hard-swish element, two per sigmoid
  element, k*k per average-pool output; masked LGC/SFR convs at their condensed cost
  (dense cost / C), whatever the masks are now.
- ``exec_flops`` / ``params``: what the module computes as it stands: a masked layer
  pays its dense conv; gathers and scatter-adds of compact layers count one op per
  element moved; every parameter counts.

Modules that run math functionally (not through a child module) describe it with a
``cost(inputs, output) -> (paper_flops, exec_flops)`` method; the counter calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import CondensingConv1x1

_ACT_OPS = {nn.ReLU: 1, nn.ReLU6: 1, nn.Hardswish: 1, nn.Sigmoid: 2}


@dataclass
class LayerCost:
    name: str
    kind: str
    paper_flops: float
    exec_flops: float
    paper_params: float
    params: float


@dataclass
class CostReport:
    """Per-sample costs. FLOPs are multiply-adds, as the papers count them."""

    paper_flops: float
    paper_params: float
    exec_flops: float
    params: float
    input_size: tuple[int, int, int]
    layers: list[LayerCost] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "paper_flops": self.paper_flops,
            "paper_params": self.paper_params,
            "exec_flops": self.exec_flops,
            "params": self.params,
            "units": {"flops": "multiply-adds per sample", "params": "count"},
        }

    def summary(self) -> str:
        return (
            f"paper rule: {self.paper_flops / 1e6:.2f}M FLOPs, {self.paper_params / 1e6:.2f}M params | "
            f"as executed: {self.exec_flops / 1e6:.2f}M FLOPs, {self.params / 1e6:.2f}M params "
            f"(multiply-adds per {self.input_size[1]}x{self.input_size[2]} sample)"
        )


def _module_flops(m: nn.Module, inputs: tuple, out: torch.Tensor) -> tuple[float, float] | None:
    if hasattr(m, "cost"):
        return m.cost(inputs, out)
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        ops = m.in_channels // m.groups * m.out_channels * kh * kw * out.shape[2] * out.shape[3]
        return ops, ops
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features, m.in_features * m.out_features
    for cls, per in _ACT_OPS.items():
        if isinstance(m, cls):
            return per * out[0].numel(), per * out[0].numel()
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        x = inputs[0]
        window = (x.shape[2] // out.shape[2]) * (x.shape[3] // out.shape[3])
        return out[0].numel() * window, out[0].numel() * window
    return None


def _param_costs(model: nn.Module) -> dict[str, tuple[float, float]]:
    """name -> (paper-rule params, params) for every module owning parameters directly."""
    divisor: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, CondensingConv1x1):
            divisor[id(m.conv.weight)] = m.condense_factor  # the weight, not the bias
    costs = {}
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own:
            paper = sum(p.numel() / divisor.get(id(p), 1) for p in own)
            costs[name] = (paper, float(sum(p.numel() for p in own)))
    return costs


@torch.no_grad()
def count_cost(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> CostReport:
    """Count the per-sample cost of ``model`` at ``input_size`` (C, H, W)."""
    rows: dict[str, LayerCost] = {}
    params = _param_costs(model)

    def hook(name):
        def fn(m, inputs, out):
            flops = _module_flops(m, inputs, out)
            if flops is None:
                return
            row = rows.setdefault(name, LayerCost(name, type(m).__name__, 0.0, 0.0, 0.0, 0.0))
            row.paper_flops += flops[0]
            row.exec_flops += flops[1]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        model(torch.zeros(1, *input_size, dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, (pp, pn) in params.items():
        row = rows.setdefault(name, LayerCost(name, type(model.get_submodule(name)).__name__, 0.0, 0.0, 0.0, 0.0))
        row.paper_params, row.params = pp, pn
    layers = list(rows.values())
    return CostReport(
        paper_flops=sum(r.paper_flops for r in layers),
        paper_params=sum(r.paper_params for r in layers),
        exec_flops=sum(r.exec_flops for r in layers),
        params=sum(r.params for r in layers),
        input_size=tuple(input_size),
        layers=layers,
    )
