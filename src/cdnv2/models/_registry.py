"""Model registry: names -> builder functions (timm ``register_model`` style).

Unlike timm, registering a name twice raises, and an unknown name is answered with
the close matches.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

from .features import features_only as features_only_net

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its ``__name__``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by a shell-style pattern."""
    names = sorted(_MODELS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(list_models())}"
    return f"unknown model {name!r}; {hint}"


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, *, features_only: bool = False, out_indices=None, **overrides) -> nn.Module:
    """Build a registered model; keyword ``overrides`` replace fields of its config.

    ``features_only=True`` returns a backbone giving the map after each dense block
    (``out_indices`` selects blocks, default all) with ``model.feature_info``.
    """
    if "pretrained" in overrides:
        raise ValueError("cdnv2.models.create_model builds randomly initialised models; load weights "
                         "with cdnv2.create_model(name, pretrained=PATH)")
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(unknown_model_message(name)) from None
    model = builder(**overrides)
    if features_only:
        return features_only_net(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices needs features_only=True")
    return model
