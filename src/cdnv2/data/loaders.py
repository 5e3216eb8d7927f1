"""``build_data``: datasets, per-sample seeded transforms, samplers and loaders.

Augmentation randomness is a function of (seed, epoch, sample index) only: each sample
seeds the torch and Python RNGs from those before its transform runs (and restores them
after, so the main process's RNGs are untouched with ``num_workers=0``). Batches are
therefore identical for any number of workers, and a resumed run sees the same
augmentations as an uninterrupted one.

Unreadable images never surface as a worker traceback: the sample comes back marked,
and the loader raises :class:`DataError` with the file's name in the main process (or,
with ``on_corrupt="skip"``, counts it, logs it once and goes on).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .. import signals
from . import cifar, folders, shapes
from .config import DataConfig, DataError, check_data_config
from .samplers import ShardSampler, TrainBatchSampler, mix_seed
from .transforms import build_eval_transform, build_train_transform, eval_preprocess

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_STATS = {  # the dataset's own channel statistics, used when data.mean / data.std are None
    "shapes": ([0.5, 0.5, 0.5], [0.3, 0.3, 0.3]),
    "cifar10": ([0.4914, 0.4824, 0.4467], [0.2471, 0.2435, 0.2616]),  # CondenseNet's values
    "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}
_MAX_REPLACEMENTS = 64  # consecutive unreadable images before giving up in skip mode


class Sample(NamedTuple):
    image: Optional[torch.Tensor]  # None: the sample was dropped or failed
    target: int
    skipped: tuple[str, ...]  # unreadable files passed over for this sample
    error: Optional[str]  # set in raise mode: the DataError message to raise


class SeededDataset(Dataset):
    """``transform(source.load(index))`` under RNGs seeded from (seed, epoch, index).

    Keys are ``(epoch, index)`` pairs (train) or plain indices (eval, epoch 0). With
    ``on_corrupt="skip"``, an unreadable train image is replaced by the next readable one
    (deterministically), an unreadable eval image is dropped from its batch.
    """

    def __init__(self, source, transform: Callable, seed: int, on_corrupt: str, replace: bool):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.on_corrupt = on_corrupt
        self.replace = replace

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped: list[str] = []
        for attempt in range(_MAX_REPLACEMENTS if self.replace else 1):
            candidate = (index + attempt) % len(self.source)
            try:
                img, target = self.source.load(candidate)
            except DataError as e:
                if self.on_corrupt == "raise":
                    return Sample(None, -1, (), str(e))
                skipped.append(self.source.describe(candidate))
                continue
            return Sample(self._transform(img, mix_seed(self.seed, 2, epoch, index, attempt)), target, tuple(skipped), None)
        if not self.replace:
            return Sample(None, -1, tuple(skipped), None)
        return Sample(None, -1, tuple(skipped), (
            f"{_MAX_REPLACEMENTS} consecutive images from {skipped[0]} on are unreadable; "
            "data.on_corrupt=skip does not cover a dataset this damaged. Check the files."
        ))

    def _transform(self, img, seed: int) -> torch.Tensor:
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA RNGs are left alone
        random.seed(seed)
        try:
            return self.transform(img)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)


def collate_samples(samples: list[Sample]):
    """-> (images, targets, skipped files, error); images is None if nothing is left."""
    error = next((s.error for s in samples if s.error), None)
    skipped = [path for s in samples for path in s.skipped]
    kept = [(s.image, s.target) for s in samples if s.image is not None]
    if error or not kept:
        return None, None, skipped, error
    images, targets = default_collate(kept)
    return images, targets, skipped, None


class CheckedLoader(DataLoader):
    """A DataLoader over a :class:`SeededDataset` that yields ``(images, targets)``,
    raises DataError for an unreadable file and counts (and logs once) skipped ones."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, collate_fn=collate_samples, **kwargs)
        self.num_skipped = 0
        self._logged: set[str] = set()

    def __iter__(self):
        # Workers fork with SIGINT/SIGTERM blocked and then ignore them (quiet_worker):
        # a signal to the whole process group is the main process's to handle.
        with signals.blocked(self.num_workers > 0):
            batches = super().__iter__()
        for images, targets, skipped, error in batches:
            if error:
                self._stop_workers()
                raise DataError(error)
            for path in skipped:
                self.num_skipped += 1
                if path not in self._logged:
                    self._logged.add(path)
                    log.warning("skipped an unreadable image (data.on_corrupt=skip): %s", path)
            if images is not None:
                yield images, targets

    def _stop_workers(self) -> None:
        # The epoch is abandoned with batches still in flight: stop persistent workers
        # now, rather than from a garbage collection at some later, arbitrary point.
        # DataLoader has no public call for that: _shutdown_workers is what its iterator's
        # own __del__ runs.
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self._iterator = None


@dataclass
class Data:
    """What :func:`build_data` returns: one rank's loaders and what the trainer needs."""

    train_loader: CheckedLoader
    val_loader: CheckedLoader
    num_classes: int
    class_names: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) of a model input
    eval_preprocess: dict  # primitives; build_eval_transform(eval_preprocess) rebuilds it
    steps_per_epoch: int  # train batches per rank per epoch
    train_sampler: TrainBatchSampler = field(repr=False)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before each epoch; ``start_batch=k`` resumes at batch k of that epoch."""
        self.train_sampler.set_epoch(epoch, start_batch)

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far (``on_corrupt="skip"``)."""
        return self.train_loader.num_skipped + self.val_loader.num_skipped


def _build_sources(cfg: DataConfig, seed: int) -> tuple[Any, Any, list[str]]:
    if cfg.name == "shapes":
        # Train and val from different streams of the run's seed: no image is shared.
        x, y = shapes.make_shapes(cfg.num_train, mix_seed(seed, 3, 0), cfg.image_size)
        xv, yv = shapes.make_shapes(cfg.num_val, mix_seed(seed, 3, 1), cfg.image_size)
        return (
            cifar.InMemoryImages(x, y, "shapes/train"),
            cifar.InMemoryImages(xv, yv, "shapes/val"),
            list(shapes.SHAPES_CLASSES),
        )
    if cfg.name in ("cifar10", "cifar100"):
        return cifar.build_cifar_datasets(cfg.name, cfg.root, cfg.download)
    train, val, classes = folders.build_folder_datasets(cfg.root, cfg.name, cfg.val_fraction, cfg.split_seed)
    if cfg.name == "imagenet" and len(classes) != 1000:
        log.warning("data=imagenet: found %d classes in %s/train, expected 1000 (ILSVRC-2012)", len(classes), cfg.root)
    return train, val, classes


def build_data(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1, device_type: str = "cpu") -> Data:
    """Datasets, transforms and loaders of one rank, checked before any image is decoded.

    ``cfg.batch_size`` is the global batch: each rank gets ``batch_size // world_size``.
    Raises :class:`DataError` (a message to print, no traceback needed) for a bad
    config or a missing / malformed dataset.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1}")
    check_data_config(cfg, world_size)
    train_src, val_src, classes = _build_sources(cfg, seed)
    if len(val_src) == 0:
        raise DataError(f"data={cfg.name}: the validation set is empty.")
    mean = list(cfg.mean) if cfg.mean is not None else _STATS[cfg.name][0]
    std = list(cfg.std) if cfg.std is not None else _STATS[cfg.name][1]
    preprocess = eval_preprocess(cfg, mean, std)
    train_set = SeededDataset(train_src, build_train_transform(cfg, mean, std), seed, cfg.on_corrupt, replace=True)
    val_set = SeededDataset(val_src, build_eval_transform(preprocess), seed, cfg.on_corrupt, replace=False)

    batch = cfg.batch_size // world_size
    eval_batch = max(1, (cfg.eval_batch_size or cfg.batch_size) // world_size)
    sampler = TrainBatchSampler(len(train_set), batch, seed=seed, rank=rank, world_size=world_size)
    common: dict[str, Any] = dict(
        num_workers=cfg.num_workers,
        pin_memory=device_type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        # Only the workers' base seed comes from here (unused: samples seed themselves);
        # a private generator keeps the loader from drawing on the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=signals.quiet_worker,
    )
    train_loader = CheckedLoader(train_set, batch_sampler=sampler, **common)
    val_loader = CheckedLoader(
        val_set, batch_size=eval_batch, sampler=ShardSampler(len(val_set), rank, world_size), drop_last=False, **common
    )
    return Data(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=len(classes),
        class_names=list(classes),
        input_size=(3, cfg.image_size, cfg.image_size),
        eval_preprocess=preprocess,
        steps_per_epoch=sampler.steps_per_epoch,
        train_sampler=sampler,
    )
