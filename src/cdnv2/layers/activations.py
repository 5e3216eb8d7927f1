"""Activation factory: configs and model code name activations by string."""
from __future__ import annotations

from typing import Callable

from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    # x * relu6(x + 3) / 6, the paper's h-swish; PyTorch's kernel computes exactly that.
    "hswish": lambda: nn.Hardswish(inplace=True),
    "identity": nn.Identity,
}


def create_act(name: str) -> nn.Module:
    """Build an activation module from its name ('relu', 'hswish', 'identity')."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None
