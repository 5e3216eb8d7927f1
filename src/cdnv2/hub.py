"""Models with weights from a file: ``cdnv2.create_model(name, pretrained=PATH)``.

This is also what the ``torch.hub`` entry points of ``hubconf.py`` call::

    model = torch.hub.load("path/to/cdnv2", "cdnv2_b", source="local", weights="cdnv2_b.safetensors")

``pretrained`` is a file: a cdnv2 checkpoint or compact artifact (``.pt`` or
``.safetensors``) or an official CondenseNetV2 release file (its EMA weights when it has
them). Nothing is downloaded: no release has a URL and checksum this package could trust.
The file fixes the architecture, so model options may only repeat what it records;
``num_classes`` may differ, and then the classifier is replaced (fine-tuning, as timm).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .models import create_model as create_random_model
from .models import features_only as features_only_net

__all__ = ["create_model", "load_pretrained"]


def create_model(name: str, *, pretrained: Optional[str | os.PathLike] = None, features_only: bool = False,
                 out_indices=None, **overrides) -> nn.Module:
    """Build a registered model, randomly initialised or (``pretrained=PATH``) with the
    weights of that file, in eval mode with ``model.cdnv2_meta`` (class names,
    preprocessing) as :func:`cdnv2.load_model` gives it. See the module docstring."""
    if pretrained is None or pretrained is False:
        return create_random_model(name, features_only=features_only, out_indices=out_indices, **overrides)
    if pretrained is True:
        raise ValueError(
            f"pretrained=True: cdnv2 downloads no weights; give a file, e.g. create_model({name!r}, "
            "pretrained='model_compact.safetensors') (a cdnv2 checkpoint or artifact, or an official "
            "CondenseNetV2 release file)"
        )
    model = load_pretrained(name, pretrained, **overrides)
    if features_only:
        return features_only_net(model, out_indices).eval()
    if out_indices is not None:
        raise ValueError("out_indices needs features_only=True")
    return model


def load_pretrained(name: str, path: str | os.PathLike, **overrides) -> nn.Module:
    """``name`` with the weights of ``path`` (a cdnv2 file or an official release file)."""
    from . import checkpoint
    from .compact import official
    from .errors import CheckpointError

    where = f"pretrained={path}"
    obj = checkpoint.read_file(path, label=where)
    if checkpoint.is_cdnv2(obj):
        checkpoint.validate(obj, where)
        if obj["model_name"] != name:
            raise CheckpointError(
                f"{where} holds a {obj['model_name']} model, not {name}: use "
                f"create_model({obj['model_name']!r}, pretrained=...) or cdnv2.load_model(path)"
            )
        model = checkpoint.load_model(obj)
    elif official.official_state_dict(obj) is not None:
        use_ema = isinstance(obj, dict) and isinstance(obj.get("state_dict_ema"), dict)
        model = checkpoint.load_official_checkpoint(obj, name, use_ema=use_ema)
        model.cdnv2_meta = {"class_names": None, "preprocess": official.official_preprocess(name),
                            "model_name": name, "model_kwargs": _arch(model), "weights": "ema" if use_ema else "raw"}
    else:
        raise CheckpointError(
            f"{where} is neither a cdnv2 checkpoint nor an official CondenseNetV2 file (it holds "
            f"{checkpoint.describe(obj)})"
        )
    _apply_overrides(model, overrides, Path(path).name)
    return model.eval()


def _arch(model: nn.Module) -> dict:
    return model.arch_kwargs() if hasattr(model, "arch_kwargs") else {}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _apply_overrides(model: nn.Module, overrides: dict, file: str) -> None:
    """Options must repeat the file's architecture; a new ``num_classes`` replaces the classifier."""
    arch = _arch(model)
    for key, value in overrides.items():
        if key == "num_classes" and arch.get(key) != value and hasattr(model, "reset_classifier"):
            model.reset_classifier(int(value))
            if getattr(model, "cdnv2_meta", None):
                model.cdnv2_meta["class_names"] = None
        elif key not in arch:
            raise ValueError(f"unknown model option {key!r} for {type(model).__name__}; "
                             f"options: {', '.join(sorted(arch))}")
        elif not _same(arch[key], value):
            raise ValueError(
                f"{key}={value!r} does not match the weights in {file} ({key}={arch[key]!r}); the file "
                "fixes the architecture: leave the option out (only num_classes may change)"
            )
