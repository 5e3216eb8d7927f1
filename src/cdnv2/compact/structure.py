"""The life cycle of a model's 1x1 layers, and how to tell where a model stands.

::

    masked ──(all masks final, training)──> compact_training ──(convert_model)──> compact
       └───────────────────────(convert_model)──────────────────────────────────────┘

- ``MASKED``: LGC/SFR layers with 0/1 masks (:mod:`cdnv2.layers.condensing`); what a
  model is until its last condensation step.
- ``COMPACT_TRAINING``: masks final, masked layers swapped for their training compact
  form (:func:`cdnv2.compact.to_compact_training`); the second half of training.
- ``COMPACT``: the inference form (:func:`cdnv2.compact.convert_model`), what the compact
  artifact holds and what is exported.

The values are the strings stored in checkpoint files (``"compact_train"`` for the
training form), so a file written before the enum existed reads the same.
"""
from __future__ import annotations

import enum

from torch import nn

from ..layers import CompactTrainLGC, CondensingConv1x1


class Structure(str, enum.Enum):
    MASKED = "masked"
    COMPACT_TRAINING = "compact_train"
    COMPACT = "compact"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def model_structure(model: nn.Module) -> Structure:
    """Where ``model`` stands: any masked layer left -> MASKED; else any training LGC ->
    COMPACT_TRAINING; else COMPACT (models without LGC/SFR layers, e.g. DenseNet, read as
    COMPACT: they have one form)."""
    mods = list(model.modules())
    if any(isinstance(m, CondensingConv1x1) for m in mods):
        return Structure.MASKED
    if any(isinstance(m, CompactTrainLGC) for m in mods):
        return Structure.COMPACT_TRAINING
    return Structure.COMPACT
