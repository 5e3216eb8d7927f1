"""Tensor-level building blocks, re-exported flat (timm style)."""
from .activations import create_act
from .condensing import CondensingConv1x1, LearnedGroupConv, LearnedLinear, SparseFeatureReactivation
from .conv_unit import PreActConv
from .shuffle import grouped_to_interleaved, interleaved_to_grouped, interleaved_to_grouped_index
from .squeeze_excite import SqueezeExcite

__all__ = [
    "CondensingConv1x1",
    "LearnedGroupConv",
    "LearnedLinear",
    "PreActConv",
    "SparseFeatureReactivation",
    "SqueezeExcite",
    "create_act",
    "grouped_to_interleaved",
    "interleaved_to_grouped",
    "interleaved_to_grouped_index",
]

# Compact (condensed) layers; appended by the conversion work.
from .compact import (  # noqa: E402
    CompactDenseBlock,
    CompactDenseLayer,
    CompactFeatures,
    CompactLGC,
    CompactLinear,
    CompactSFR,
    CompactTrainLGC,
)

__all__ += [
    "CompactDenseBlock",
    "CompactDenseLayer",
    "CompactFeatures",
    "CompactLGC",
    "CompactLinear",
    "CompactSFR",
    "CompactTrainLGC",
]
