"""Datasets, transforms and loaders: ``build_data(DataConfig, seed=...)`` is the entry point."""
from .config import DATASETS, DataConfig, DataError, check_data_config
from .loaders import Data, build_data
from .mixup import mixup_cutmix
from .samplers import ShardSampler, TrainBatchSampler
from .shapes import SHAPES_CLASSES, make_shapes
from .transforms import RandAugmentNoise, build_eval_transform, build_train_transform

__all__ = [
    "DATASETS",
    "Data",
    "DataConfig",
    "DataError",
    "RandAugmentNoise",
    "SHAPES_CLASSES",
    "ShardSampler",
    "TrainBatchSampler",
    "build_data",
    "build_eval_transform",
    "build_train_transform",
    "check_data_config",
    "make_shapes",
    "mixup_cutmix",
]
