"""The data config (also the Hydra schema of the ``data`` group) and the data error."""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import DataError  # noqa: F401  (re-exported: cdnv2.data.DataError)

DATASETS = ("shapes", "cifar10", "cifar100", "imagenet", "imagefolder")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
ON_CORRUPT = ("raise", "skip")
MAX_IMAGE_SIZE = 4096  # pixels per side; CondenseNetV2's recipes use 32 to 320
MIN_SHAPES_SIZE = 8  # the generated shapes need a few pixels to be told apart
AUTO_AUGMENTS = ("randaugment", "trivialaugment", "autoaugment", "augmix", "none")


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
    auto_augment: str = "randaugment"  # randaugment (when randaugment_magnitude is set) | trivialaugment | autoaugment | augmix | none
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


def check_data_config(cfg: DataConfig, world_size: int = 1) -> None:
    """Raise :class:`DataError` for a value of ``cfg`` that cannot work (before any file is read)."""
    if cfg.name not in DATASETS:
        close = difflib.get_close_matches(cfg.name, DATASETS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise DataError(f"Unknown data={cfg.name!r}; {hint}use one of the known datasets: {', '.join(DATASETS)}.")
    if cfg.interpolation not in INTERPOLATIONS:
        raise DataError(f"data.interpolation={cfg.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}; use one of them.")
    if cfg.on_corrupt not in ON_CORRUPT:
        raise DataError(f"data.on_corrupt={cfg.on_corrupt!r} is not one of {', '.join(ON_CORRUPT)}; use one of them.")
    if cfg.batch_size < 1 or cfg.batch_size % world_size:
        raise DataError(
            f"data.batch_size={cfg.batch_size} must be a positive multiple of the world size {world_size}; "
            "set data.batch_size to such a value (it is the global batch)."
        )
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        raise DataError(f"data.eval_batch_size={cfg.eval_batch_size} must be positive; set a positive value, or null.")
    if cfg.num_workers < 0 or cfg.image_size < 1 or cfg.crop_padding < 0:
        raise DataError(
            f"data.num_workers={cfg.num_workers}, data.image_size={cfg.image_size} and "
            f"data.crop_padding={cfg.crop_padding} must not be negative (image_size >= 1); set them accordingly."
        )
    _check_sizes(cfg, world_size)
    if cfg.eval_resize is not None and cfg.eval_resize < cfg.image_size:
        # The centre crop would be larger than the resized image and pad it with black.
        raise DataError(
            f"data.eval_resize={cfg.eval_resize} is smaller than data.image_size={cfg.image_size}: the "
            "eval crop would not fit. Set data.eval_resize >= data.image_size, or null to resize to the crop."
        )
    _check_fractions(cfg)
    for key in ("mean", "std"):
        value = getattr(cfg, key)
        if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
            raise DataError(
                f"data.{key}={list(value)} needs 3 values (R, G, B), all finite; give three, or null "
                "for the dataset's own."
            )
    if cfg.std is not None and min(cfg.std) <= 0:
        raise DataError(f"data.std={list(cfg.std)} must be positive; give three positive values, or null.")
    _check_randaugment(cfg)
    if cfg.name == "shapes" and (cfg.num_train < 1 or cfg.num_val < 1):
        raise DataError(f"data.num_train={cfg.num_train} and data.num_val={cfg.num_val} must be positive; set both >= 1.")


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_sizes(cfg: DataConfig, world_size: int) -> None:
    """Sizes that would exhaust memory long before a useful error: refuse them up front."""
    size = cfg.image_size
    if size > MAX_IMAGE_SIZE or (cfg.eval_resize or 0) > MAX_IMAGE_SIZE:
        raise DataError(
            f"data.image_size={size} (data.eval_resize={cfg.eval_resize}) is larger than {MAX_IMAGE_SIZE} "
            f"pixels per side, which no network here is built for (one {size}x{size} image alone is "
            f"{_gib(3 * 4 * size * size)} as float32). Use e.g. data.image_size=224."
        )
    if cfg.name == "shapes" and size < MIN_SHAPES_SIZE:
        raise DataError(
            f"data.image_size={size} is too small for the generated shapes data: they need at least "
            f"{MIN_SHAPES_SIZE}x{MIN_SHAPES_SIZE} pixels to be told apart. Use data.image_size >= "
            f"{MIN_SHAPES_SIZE} (the default is 32)."
        )
    memory = memory_bytes()
    if memory is None:
        return
    image = 3 * 4 * (cfg.eval_resize or size) ** 2  # one float32 image as the network sees it
    for key, batch in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.eval_batch_size or cfg.batch_size)):
        per_rank = -(-batch // world_size) * image
        if per_rank > memory // 4:  # the network's activations take many times the input
            raise DataError(
                f"data.{key}={batch} at data.image_size={size} cannot fit in memory: one batch of "
                f"images alone is {_gib(per_rank)} per process, and this machine has {_gib(memory)} "
                f"(activations need many times that). Lower data.{key}."
            )
    if cfg.name == "shapes" and (cfg.num_train + cfg.num_val) * 3 * size * size > memory // 2:
        raise DataError(
            f"data.num_train={cfg.num_train} + data.num_val={cfg.num_val} generated {size}x{size} images "
            f"are {_gib((cfg.num_train + cfg.num_val) * 3 * size * size)}, held in memory; this machine "
            f"has {_gib(memory)}. Lower data.num_train / data.num_val or data.image_size."
        )


def _check_fractions(cfg: DataConfig) -> None:
    if not 0 <= cfg.val_fraction < 1:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1); set e.g. data.val_fraction=0.1, or 0.")
    if not 0 <= cfg.random_erasing <= 1 or not 0 < cfg.rrc_scale_min <= 1:
        raise DataError(
            f"data.random_erasing={cfg.random_erasing} must be in [0, 1] and "
            f"data.rrc_scale_min={cfg.rrc_scale_min} in (0, 1]; set them in those ranges."
        )


def _check_randaugment(cfg: DataConfig) -> None:
    bins = cfg.randaugment_num_bins
    if bins < 2 or cfg.randaugment_num_ops < 0 or not 0 <= cfg.randaugment_mstd < math.inf:
        raise DataError(
            f"data.randaugment_num_bins={bins} must be >= 2, data.randaugment_num_ops="
            f"{cfg.randaugment_num_ops} >= 0 and data.randaugment_mstd={cfg.randaugment_mstd} >= 0; "
            "set them in those ranges (timm's rand-m9-mstd0.5: 11 bins, 2 ops, mstd 0.5)."
        )
    magnitude = cfg.randaugment_magnitude
    if magnitude is not None and not 0 <= magnitude <= bins - 1:
        raise DataError(
            f"data.randaugment_magnitude={magnitude} is outside the scale 0..{bins - 1} set by "
            f"data.randaugment_num_bins={bins}; use a magnitude in that range (timm's rand-m9 is 9), "
            "or null to turn RandAugment off."
        )
