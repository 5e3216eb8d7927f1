"""The masked -> compact life cycle (:class:`Structure`): conversion, the dense-level
compact containers and their fused inference path, and the official release import.

==================  =============================================================
``structure.py``    the :class:`Structure` enum and :func:`model_structure`
``convert.py``      masked -> compact-training -> compact; parity; restructuring
``fold.py``         the dense-layer interface and the fold of one layer (and its inverse)
``dense.py``        CompactDenseLayer / Block / Features (the inference containers)
``fused_plan.py``   what the eager fused inference path derives from one layer's fold
``fused_run.py``    the eager fused inference path itself (block buffers, workspace)
``static_run.py``   the traced path (torch.compile / torch.export): folds as buffers
``official.py``     official CondenseNetV2 release files: detection and key mapping
==================  =============================================================

The tensor-level compact layers (CompactLGC, CompactSFR, ...) live in
:mod:`cdnv2.layers.condensed`; the checkpoint file format in :mod:`cdnv2.checkpoint`.
"""
from .convert import (
    ParityError,
    ParityResult,
    check_fully_condensed,
    check_parity,
    convert_model,
    restructure_for_state_dict,
    to_compact_training,
)
from .dense import CompactDenseBlock, CompactDenseLayer, CompactFeatures
from .fused_run import release_workspace
from .structure import Structure, model_structure

__all__ = [
    "CompactDenseBlock",
    "CompactDenseLayer",
    "CompactFeatures",
    "ParityError",
    "ParityResult",
    "Structure",
    "check_fully_condensed",
    "check_parity",
    "convert_model",
    "model_structure",
    "release_workspace",
    "restructure_for_state_dict",
    "to_compact_training",
]
