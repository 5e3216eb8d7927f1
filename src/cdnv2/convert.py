"""Masked -> compact models, parity checks, and the compact artifact (SPEC 6).

- :func:`convert_model` turns a fully condensed masked model into its inference form
  (a deep copy; the input model is untouched).
- :func:`to_compact_training` swaps masked layers for their training-capable compact
  form in place once all masks are final, and hands their optimizer state over.
- :func:`restructure_for_state_dict` makes a freshly built model take the structure a
  state dict was saved with, so that ``load_state_dict`` works.
- :func:`save_compact` / :func:`load_model` write and read checkpoints; ``load_model``
  rebuilds any cdnv2 checkpoint (compact artifact or training checkpoint).

Like ``condense``, this module walks any model for LGC/SFR layers: it needs no model code
beyond ``create_model`` and the dense-layer attribute names (conv_1, conv_2, se, sfr).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import atomic_save
from .errors import CheckpointError
from .layers import CondensingConv1x1, LearnedGroupConv, LearnedLinear, SparseFeatureReactivation
from .layers.compact import (
    CompactDenseBlock,
    CompactDenseLayer,
    CompactFeatures,
    CompactLGC,
    CompactLinear,
    CompactSFR,
    CompactTrainLGC,
    gather_lgc_weight,
    gather_linear_weight,
    gather_sfr_weight,
)

__all__ = [
    "CheckpointError",
    "ParityError",
    "ParityResult",
    "check_parity",
    "convert_model",
    "load_model",
    "restructure_for_state_dict",
    "save_compact",
    "to_compact_training",
]

FORMAT = "cdnv2"
ARTIFACT_VERSION = 1
_REQUIRED = {
    "compact": ("format", "kind", "version", "model_name", "model_kwargs", "structure", "model_state"),
    "train": ("format", "kind", "model_name", "model_kwargs", "structure", "model_state", "ema_state"),
}
_STRUCTURES = ("masked", "compact_train", "compact")


class ParityError(ValueError):
    """The compact model does not reproduce the masked model's outputs."""


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    output_scale: float  # max |output| of the reference model
    ok: bool

    def __str__(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.3g} at output scale {self.output_scale:.3g} "
                f"({'ok' if self.ok else 'MISMATCH'})")


# ----------------------------------------------------------------------------- helpers
def _condensing_layers(model: nn.Module) -> list[tuple[str, CondensingConv1x1]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CondensingConv1x1)]


def check_fully_condensed(model: nn.Module) -> None:
    """Raise a ValueError naming the first layer whose masks are not final yet."""
    for name, m in _condensing_layers(model):
        if not m.fully_condensed:
            raise ValueError(
                f"{name} is at stage {int(m.stage)} of {m.num_steps}: the model is not fully "
                "condensed yet, so it has no compact form. Finish training (the last "
                "condensation step fires at half of training) or call condense_step() on it."
            )


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _is_dense_layer(m: nn.Module) -> bool:
    return (not isinstance(m, CompactDenseLayer) and all(hasattr(m, a) for a in ("conv_1", "conv_2", "se", "sfr"))
            and isinstance(m.conv_1, (LearnedGroupConv, CompactTrainLGC, CompactLGC))
            and not isinstance(m.conv_1, LearnedLinear))


def _to_eval_lgc(m: nn.Module) -> CompactLGC:
    if isinstance(m, CompactLGC):
        return m
    if isinstance(m, CompactTrainLGC):  # BN on all inputs -> BN on the selected ones
        new = CompactLGC(m.in_channels, m.out_channels, groups=m.groups,
                         condense_factor=m.condense_factor, act=m.act_name).to(m.conv.weight)
        idx = m.long_index()
        with torch.no_grad():
            new.index.copy_(m.train_index)
            new.conv.weight.copy_(m.conv.weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new.norm, name).data.copy_(getattr(m.norm, name)[idx])
        new.norm.num_batches_tracked.copy_(m.norm.num_batches_tracked)
        new.norm.eps, new.norm.momentum = m.norm.eps, m.norm.momentum
        return new
    return CompactLGC.from_masked(m)


def _to_eval_sfr(m: nn.Module | None) -> CompactSFR | None:
    if m is None or isinstance(m, CompactSFR):
        return m
    return CompactSFR.from_masked(m)


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
            layer = CompactDenseLayer(_to_eval_lgc(m.conv_1), m.conv_2, m.se, _to_eval_sfr(m.sfr))
            _set_child(compact, name, layer.eval())
    for name, m in list(compact.named_modules()):
        if isinstance(m, LearnedLinear):
            _set_child(compact, name, CompactLinear.from_masked(m).eval())
        elif isinstance(m, (LearnedGroupConv, CompactTrainLGC)):
            _set_child(compact, name, _to_eval_lgc(m).eval())
        elif isinstance(m, SparseFeatureReactivation):
            _set_child(compact, name, CompactSFR.from_masked(m).eval())
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
    for name, m in list(model.named_modules()):
        if not isinstance(m, CondensingConv1x1):
            continue
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


def model_structure(model: nn.Module) -> str:
    """'masked', 'compact_train' or 'compact' (the inference form)."""
    mods = list(model.modules())
    if any(isinstance(m, CondensingConv1x1) for m in mods):
        return "masked"
    if any(isinstance(m, CompactTrainLGC) for m in mods):
        return "compact_train"
    return "compact"


# ----------------------------------------------------------------------------- artifacts
def save_compact(path: str | os.PathLike, compact_model: nn.Module, *, model_name: str, model_kwargs: dict,
                 class_names: list[str] | None = None, preprocess: dict | None = None,
                 metrics: dict | None = None, data: dict | None = None, seed: int | None = None) -> Path:
    """Write the compact inference model as ONE self-describing file.

    A plain dict of tensors and primitives (``torch.load(path, weights_only=True)``
    reads it); ``load_model(path)`` rebuilds the model from it alone. ``data`` (the
    run's data config as a dict) and ``seed`` let ``cdnv2-eval`` rebuild the
    validation set without ``data=...``.
    """
    structure = model_structure(compact_model)
    if structure != "compact":
        raise ValueError(
            f"save_compact needs the compact inference model (convert_model(...)); this model is {structure}"
        )
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in compact_model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "kind": "compact",
        "version": ARTIFACT_VERSION,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "structure": "compact",
        "model_state": state,
        "class_names": list(class_names) if class_names is not None else None,
        "preprocess": preprocess,
        "metrics": metrics,
        "data": data,
        "seed": seed,
    }
    path = Path(path)
    atomic_save(obj, path)
    return path


def _read_checkpoint(path_or_dict: str | os.PathLike | dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, dict):
        return path_or_dict, "<checkpoint dict>"
    path = Path(path_or_dict)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes ...
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first}); the file is "
            "truncated, corrupted or not a cdnv2 checkpoint"
        ) from None
    return obj, str(path)


def _validate(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: not a cdnv2 checkpoint (holds a {type(obj).__name__}, not a dict)")
    if obj.get("format") != FORMAT:
        shown = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(
            f"{where}: not a cdnv2 checkpoint (no format='cdnv2'; keys: {shown}). Official "
            "CondenseNetV2 files are read with cdnv2.load_official_checkpoint"
        )
    kind = obj.get("kind")
    if kind not in _REQUIRED:
        raise CheckpointError(f"{where}: unknown checkpoint kind {kind!r} (expected 'compact' or 'train')")
    missing = [k for k in _REQUIRED[kind] if k not in obj]
    if missing:
        raise CheckpointError(f"{where}: {kind} checkpoint lacks key(s) {', '.join(missing)}")
    if obj["structure"] not in _STRUCTURES:
        raise CheckpointError(f"{where}: unknown structure {obj['structure']!r}; expected one of {_STRUCTURES}")
    if not isinstance(obj["model_state"], dict):
        raise CheckpointError(f"{where}: model_state is not a state dict")


def load_model(path_or_dict: str | os.PathLike | dict, *, weights: str = "ema",
               device: str | torch.device = "cpu", features_only: bool = False,
               out_indices=None) -> nn.Module:
    """Rebuild the model of any cdnv2 checkpoint, in eval mode, on ``device``.

    ``weights``: for training checkpoints, "ema" (the EMA weights when the checkpoint has
    them, else the raw ones) or "raw". The model carries ``model.cdnv2_meta`` with
    class_names, preprocess, model_name, model_kwargs, structure and the weights used.
    ``features_only``: return the backbone (``cdnv2.models.features_only``) instead,
    giving the maps after the dense blocks selected by ``out_indices``.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    from .models import create_model

    obj, where = _read_checkpoint(path_or_dict)
    _validate(obj, where)
    state, used = obj["model_state"], "raw"
    if obj["kind"] == "train" and weights == "ema" and obj.get("ema_state") is not None:
        state, used = obj["ema_state"], "ema"
    try:
        model = create_model(obj["model_name"], **dict(obj["model_kwargs"] or {}))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot build model {obj['model_name']!r}: {e}") from None
    if obj["structure"] != "masked":
        restructure_for_state_dict(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{where}: weights do not fit {obj['model_name']} ({obj['structure']}): "
            + " ".join(str(e).split())[:600]
        ) from None
    model.to(device).eval()
    model.cdnv2_meta = {
        "class_names": obj.get("class_names"),
        "preprocess": obj.get("preprocess"),
        "model_name": obj["model_name"],
        "model_kwargs": obj["model_kwargs"],
        "structure": obj["structure"],
        "weights": used,
    }
    if features_only:
        from .models import features_only as backbone

        return backbone(model, out_indices).eval()
    if out_indices is not None:
        raise ValueError("out_indices needs features_only=True")
    return model
