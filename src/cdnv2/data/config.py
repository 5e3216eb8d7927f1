"""The data config (also the Hydra schema of the ``data`` group) and the data error."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import DataError  # noqa: F401  (re-exported: cdnv2.data.DataError)

DATASETS = ("shapes", "cifar10", "cifar100", "imagenet", "imagefolder")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
ON_CORRUPT = ("raise", "skip")


@dataclass
class DataConfig:
    """What to load and how to augment it. Simple field types only: this is also the
    structured schema that Hydra checks ``data/*.yaml`` and overrides against."""

    name: str = "shapes"  # shapes | cifar10 | cifar100 | imagenet | imagefolder
    root: Optional[str] = None  # dataset folder (not used by shapes)
    batch_size: int = 128  # global train batch, split evenly across ranks
    eval_batch_size: Optional[int] = None  # global eval batch; None: batch_size
    num_workers: int = 0  # loader processes per rank; results do not depend on it
    image_size: int = 32  # train crop and eval crop (pixels, square)
    eval_resize: Optional[int] = None  # eval: short side before the crop (256 for 224); None: image_size
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic, train and eval resizing
    mean: Optional[list[float]] = None  # per-channel normalisation; None: the dataset's own
    std: Optional[list[float]] = None  # same, standard deviation
    randaugment_magnitude: Optional[float] = None  # RandAugment magnitude; None: off
    randaugment_mstd: float = 0.5  # std of the per-op magnitude noise
    randaugment_num_ops: int = 2  # ops applied per image
    randaugment_num_bins: int = 11  # magnitude scale 0..bins-1; 11 = timm's 0-10 ("rand-m9")
    random_erasing: float = 0.0  # probability of erasing a box with per-pixel noise
    hflip: bool = True  # random horizontal flip
    crop_padding: int = 0  # random crop with this zero padding (CIFAR: 4)
    random_resized_crop: bool = False  # Inception-style crop instead of resize + crop
    rrc_scale_min: float = 0.08  # smallest area fraction of a random resized crop
    download: bool = False  # cifar only: fetch it if it is missing
    val_fraction: float = 0.0  # imagefolder without val/: hold out this fraction of train
    split_seed: int = 0  # seed of that split, fixed so it does not move with the run's seed
    on_corrupt: str = "raise"  # raise | skip: what an unreadable image does
    num_train: int = 10000  # shapes: generated train images
    num_val: int = 2000  # shapes: generated val images
