"""Training engine: plain dataclass configs in, a run directory and a report out."""
from .config import ModelConfig, OptimConfig, SchedConfig, TrainConfig, TrainerConfig, config_from_dict, config_to_dict
from .trainer import Trainer, summary_table, train
from .validation import validate_config

__all__ = [
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "Trainer",
    "TrainerConfig",
    "config_from_dict",
    "config_to_dict",
    "summary_table",
    "train",
    "validate_config",
]
