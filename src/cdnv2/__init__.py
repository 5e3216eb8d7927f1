"""cdnv2: train, condense and ship CondenseNetV2 models."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Everything is imported on first use, so `import cdnv2` (and a command's --help) does not
# load torch.
_LAZY = {
    "CostReport": "cdnv2.flops",
    "count_cost": "cdnv2.flops",
    "create_model": "cdnv2.hub",  # models.create_model, plus pretrained=PATH
    "list_models": "cdnv2.models",
    "register_model": "cdnv2.models",
    "Structure": "cdnv2.compact",
    "convert_model": "cdnv2.compact",
    "check_parity": "cdnv2.compact",
    "to_compact_training": "cdnv2.compact",
    "condense_fully": "cdnv2.condense",
    "load_model": "cdnv2.checkpoint",
    "save_compact": "cdnv2.checkpoint",
    "load_official_checkpoint": "cdnv2.checkpoint",
    "Predictor": "cdnv2.predict",
}

_SUBMODULES = ("benchmark", "checkpoint", "cli", "compact", "condense", "configs", "data", "deploy", "engine",
               "errors", "evaluate", "flops", "hub", "layers", "models", "predict", "signals", "tables", "viz")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:  # cdnv2.models.features_only after a plain `import cdnv2`
        return importlib.import_module(f"cdnv2.{name}")
    raise AttributeError(f"module 'cdnv2' has no attribute {name!r}")


__all__ = list(_LAZY)
