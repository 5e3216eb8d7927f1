"""Model registry and model families."""
from . import condensenet, densenet  # noqa: F401  (registers the builders)
from ._registry import create_model, is_model, list_models, register_model, unknown_model_message
from .condensenet import CondenseNet, CondenseNetConfig, DenseLayer
from .densenet import TorchvisionDenseNet
from .features import FeatureInfo, FeatureListNet, features_only

__all__ = [
    "CondenseNet",
    "CondenseNetConfig",
    "DenseLayer",
    "FeatureInfo",
    "FeatureListNet",
    "TorchvisionDenseNet",
    "create_model",
    "features_only",
    "is_model",
    "list_models",
    "register_model",
    "unknown_model_message",
]
