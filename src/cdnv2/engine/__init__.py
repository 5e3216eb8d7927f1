"""Training engine: plain dataclass configs in, a run directory and a report out."""
from .callbacks import Callback
from .config import ModelConfig, OptimConfig, SchedConfig, TrainConfig, TrainerConfig, config_to_dict
from .finalize import summary_table
from .runtime import configure_runtime, resolve_device
from .trainer import Trainer, train
from .validation import validate_config

__all__ = [
    "Callback",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "Trainer",
    "TrainerConfig",
    "config_to_dict",
    "configure_runtime",
    "resolve_device",
    "summary_table",
    "train",
    "validate_config",
]
