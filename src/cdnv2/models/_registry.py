"""Model registry: names -> builder functions (timm ``register_model`` style).

Unlike timm, registering a name twice raises, and an unknown name is answered with
the close matches.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

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


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword ``overrides`` replace fields of its config."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(unknown_model_message(name)) from None
    return builder(**overrides)
