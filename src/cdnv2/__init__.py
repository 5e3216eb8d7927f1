"""cdnv2: train, condense and ship CondenseNetV2 models."""
from __future__ import annotations

import importlib

from .flops import CostReport, count_cost
from .hub import create_model  # models.create_model, plus pretrained=PATH
from .models import list_models, register_model

__version__ = "0.1.0"

# Heavier entry points are imported on first use so `import cdnv2` stays light.
_LAZY = {
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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdnv2' has no attribute {name!r}")


__all__ = [
    "CostReport",
    "count_cost",
    "create_model",
    "list_models",
    "register_model",
    *_LAZY,
]
