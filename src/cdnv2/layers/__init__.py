"""Tensor-level building blocks, re-exported flat (timm style)."""
from .activations import create_act
from .condensed import CompactConv1x1, CompactIndexed, CompactLGC, CompactLinear, CompactSFR, CompactTrainLGC, copy_bn
from .condensing import (
    CondensingConv1x1,
    LearnedGroupConv,
    LearnedLinear,
    SparseFeatureReactivation,
    check_condense_sizes,
)
from .conv_unit import PreActConv
from .shuffle import grouped_to_interleaved, interleaved_to_grouped, interleaved_to_grouped_index
from .squeeze_excite import SqueezeExcite

__all__ = [
    "CompactConv1x1",
    "CompactIndexed",
    "CompactLGC",
    "CompactLinear",
    "CompactSFR",
    "CompactTrainLGC",
    "CondensingConv1x1",
    "LearnedGroupConv",
    "LearnedLinear",
    "PreActConv",
    "SparseFeatureReactivation",
    "SqueezeExcite",
    "check_condense_sizes",
    "copy_bn",
    "create_act",
    "grouped_to_interleaved",
    "interleaved_to_grouped",
    "interleaved_to_grouped_index",
]
