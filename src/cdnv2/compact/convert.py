"""Masked -> compact: the conversions between the :class:`Structure` forms (SPEC 6).

- :func:`convert_model`: a fully condensed masked (or compact-training) model -> its
  inference form (a deep copy; the input model is untouched), checked for parity.
- :func:`to_compact_training`: masked layers -> their training compact form, in place,
  once all masks are final; the optimizer state is handed over.
- :func:`restructure_for_state_dict`: a freshly built masked model takes the structure a
  state dict was saved with, so that ``load_state_dict`` works.

Like ``condense``, this module walks any model for LGC/SFR layers; it finds dense layers
through their declared interface (:class:`~cdnv2.compact.fold.DenseLayerLike`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..condense import condensing_layers
from ..errors import ParityError
from ..layers import CompactLGC, CompactLinear, CompactSFR, CompactTrainLGC  # what they become
from ..layers import LearnedGroupConv, LearnedLinear, SparseFeatureReactivation  # the masked forms
from ..layers.index_kernels import gather_lgc_weight, gather_linear_weight, gather_sfr_weight
from .dense import CompactDenseBlock, CompactDenseLayer, CompactFeatures
from .fold import inference_lgc, inference_sfr, is_dense_layer

__all__ = [
    "ParityError",
    "ParityResult",
    "check_fully_condensed",
    "check_parity",
    "convert_model",
    "restructure_for_state_dict",
    "to_compact_training",
]


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    output_scale: float  # max |output| of the reference model
    ok: bool

    def __str__(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.3g} at output scale {self.output_scale:.3g} "
                f"({'ok' if self.ok else 'MISMATCH'})")


# ----------------------------------------------------------------------------- helpers
def check_fully_condensed(model: nn.Module) -> None:
    """Raise a ValueError naming the first layer whose masks are not final yet."""
    for name, m in condensing_layers(model):
        if not m.fully_condensed:
            raise ValueError(
                f"{name} is at stage {int(m.stage)} of {m.num_steps}: the model is not fully "
                "condensed yet, so it has no compact form. Finish training (the last "
                "condensation step fires at half of training) or call cdnv2.condense_fully(model)."
            )


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _is_dense_layer(m: nn.Module) -> bool:
    """A dense layer not yet in its inference container."""
    return is_dense_layer(m) and not isinstance(m, CompactDenseLayer)


def _retype_sequential(model: nn.Module, name: str, seq: nn.Sequential, cls: type) -> None:
    new = cls()
    for child_name, child in seq.named_children():
        new.add_module(child_name, child)
    new.train(seq.training)
    if name:
        _set_child(model, name, new)


def _blocks_to_compact(model: nn.Module) -> None:
    """Dense blocks whose layers are all compact run fused (CompactDenseBlock), and so
    does the Sequential holding them (CompactFeatures: transitions fused)."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Sequential and len(m) and all(isinstance(c, CompactDenseLayer) for c in m):
            _retype_sequential(model, name, m, CompactDenseBlock)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Sequential and any(isinstance(c, CompactDenseBlock) for c in m):
            _retype_sequential(model, name, m, CompactFeatures)


# ----------------------------------------------------------------------------- convert
def convert_model(model: nn.Module, *, check: bool = True, example_input: torch.Tensor | None = None,
                  atol_rel: float = 1e-4) -> nn.Module:
    """A compact inference copy of a fully condensed ``model`` (in eval mode).

    ``check``: run both models on ``example_input`` (default: two random images of a size
    the model accepts) and raise :class:`ParityError` if the outputs differ by more than
    ``atol_rel`` times the output scale.
    """
    check_fully_condensed(model)
    compact = copy.deepcopy(model).eval()
    for name, m in list(compact.named_modules()):
        if _is_dense_layer(m):
            layer = CompactDenseLayer(inference_lgc(m.conv_1), m.conv_2, m.se, inference_sfr(m.sfr))
            _set_child(compact, name, layer.eval())
    for name, m in list(compact.named_modules()):
        if isinstance(m, LearnedLinear):
            _set_child(compact, name, CompactLinear.from_masked(m).eval())
        elif isinstance(m, (LearnedGroupConv, CompactTrainLGC)):
            _set_child(compact, name, inference_lgc(m).eval())
        elif isinstance(m, SparseFeatureReactivation):
            _set_child(compact, name, inference_sfr(m).eval())
    _blocks_to_compact(compact)
    if check:
        x = example_input if example_input is not None else _default_input(model)
        result = check_parity(model, compact, x, atol_rel=atol_rel)
        if not result.ok:
            raise ParityError(f"compact model does not match the masked model: {result}")
    return compact


def _default_input(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters())
    cfg = getattr(model, "cfg", None)
    chans = getattr(cfg, "in_chans", 3)
    size = 32 if getattr(cfg, "stem_stride", 2) == 1 else 64
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, chans, size, size, generator=g).to(p)


@torch.no_grad()
def check_parity(masked: nn.Module, compact: nn.Module, x: torch.Tensor, *,
                 atol_rel: float = 1e-4) -> ParityResult:
    """Compare eval-mode outputs of two models on ``x`` (modes are restored afterwards)."""
    modes = [(m, m.training) for m in (masked, compact)]
    try:
        ref = masked.eval()(x)
        out = compact.eval()(x)
    finally:
        for m, mode in modes:
            m.train(mode)
    diff = float((ref.float() - out.float()).abs().max())
    scale = float(ref.float().abs().max())
    return ParityResult(diff, scale, bool(diff <= atol_rel * max(scale, 1e-12)))


# ----------------------------------------------------------------------------- training form
def to_compact_training(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Swap every fully condensed masked layer of ``model`` for its training compact form.

    Same math, forward and backward: LGC keeps BN/act on the full input then gathers
    (:class:`CompactTrainLGC`), SFR scatter-adds out of place (:class:`CompactSFR`), a
    condensed classifier becomes :class:`CompactLinear`. BN modules and the classifier
    bias are reused as they are, so their parameters (and optimizer state) stay.

    With ``optimizer``, each replaced parameter is swapped for its successor at the same
    position of ``optimizer.param_groups`` and every per-parameter state tensor of the
    parameter's shape (SGD momentum, Adam moments) is gathered with the same indices.
    """
    check_fully_condensed(model)
    swaps: dict[nn.Parameter, tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name, m in condensing_layers(model):
        kept = m.kept_indices()
        if isinstance(m, LearnedLinear):
            new = CompactLinear.from_masked(m, share_bias=True)
            new_w, gather = new.linear.weight, (lambda t, k=kept: gather_linear_weight(t, k))
        elif isinstance(m, SparseFeatureReactivation):
            new = CompactSFR.from_masked(m, share_norm=True)
            new_w, gather = new.conv.weight, (lambda t, k=kept, g=m.groups: gather_sfr_weight(t, k, g))
        else:
            new = CompactTrainLGC.from_masked(m, share_norm=True)
            new_w, gather = new.conv.weight, (lambda t, k=kept, g=m.groups: gather_lgc_weight(t, k, g))
        new_w.requires_grad_(m.conv.weight.requires_grad)
        swaps[m.conv.weight] = (new_w, gather)
        _set_child(model, name, new.train(m.training))
    if optimizer is not None:
        _hand_over_optimizer(optimizer, swaps)


def _hand_over_optimizer(optimizer: torch.optim.Optimizer, swaps: dict) -> None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p not in swaps:
                continue
            new_p, gather = swaps[p]
            group["params"][i] = new_p
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[new_p] = {
                    k: gather(v) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in state.items()
                }


# ----------------------------------------------------------------------------- restructure
def restructure_for_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> nn.Module:
    """Give a freshly built masked ``model`` the structure ``state_dict`` was saved with.

    A masked LGC whose ``<path>.index`` is in the state dict becomes the inference form
    (its dense layer a :class:`CompactDenseLayer`), one with ``<path>.train_index`` the
    training form; an SFR or condensed classifier with ``<path>.index`` its compact form.
    Returns ``model`` (changed in place) for chaining.
    """
    keys = set(state_dict)
    for name, m in list(model.named_modules()):
        if not _is_dense_layer(m) or not isinstance(m.conv_1, LearnedGroupConv):
            continue
        if f"{name}.conv_1.index" in keys:
            sfr = m.sfr
            if sfr is not None and isinstance(sfr, SparseFeatureReactivation):
                sfr = CompactSFR.empty_like(sfr)
            layer = CompactDenseLayer(CompactLGC.empty_like(m.conv_1), m.conv_2, m.se, sfr)  # shapes only
            _set_child(model, name, layer.train(m.training))
    for name, m in list(model.named_modules()):
        if isinstance(m, LearnedLinear):
            if f"{name}.index" in keys:
                _set_child(model, name, CompactLinear.empty_like(m).train(m.training))
        elif isinstance(m, SparseFeatureReactivation):
            if f"{name}.index" in keys:
                _set_child(model, name, CompactSFR.empty_like(m).train(m.training))
        elif isinstance(m, LearnedGroupConv):
            if f"{name}.index" in keys:
                _set_child(model, name, CompactLGC.empty_like(m).train(m.training))
            elif f"{name}.train_index" in keys:
                _set_child(model, name, CompactTrainLGC.empty_like(m).train(m.training))
    _blocks_to_compact(model)
    return model
