"""Samplers: seeded, resumable train batches per rank; unpadded eval shards.

The train sampler yields ``(epoch, index)`` keys rather than bare indices: the epoch
travels with each key to the loader workers (which may be persistent and hold a stale
copy of the dataset), so per-sample augmentation seeds follow ``set_epoch``.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from .config import DataError

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (SplitMix64 finaliser folded over them).

    Neighbouring inputs (seed 0 vs 1, index 41 vs 42) give unrelated outputs, unlike
    ``seed + index``; plain integer arithmetic, so it is the same on every platform.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h = (h ^ (h >> 29)) + 0x9E3779B97F4A7C15 & _MASK64
    return h >> 1


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of one rank for one epoch: a permutation seeded by (seed, epoch), dealt
    round-robin to ``world_size`` ranks, cut into full batches (the tail is dropped, so
    every epoch has :attr:`steps_per_epoch` batches on every rank).

    ``set_epoch(epoch, start_batch=k)`` makes the next pass start at batch ``k``: the
    batches it yields are exactly batches ``k..`` of an uninterrupted epoch, which is how
    a run resumes mid-epoch.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.per_rank = num_samples // world_size
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"The train set has {num_samples} images: too few for one batch of {batch_size} per rank "
                f"on {world_size} rank(s). Lower data.batch_size or use more data."
            )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch={start_batch} is outside 0..{self.steps_per_epoch} (steps per epoch)")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 1, self.epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        mine = order[self.rank : self.per_rank * self.world_size : self.world_size].tolist()
        bs = self.batch_size
        for b in range(self.start_batch, self.steps_per_epoch):
            yield [(self.epoch, i) for i in mine[b * bs : (b + 1) * bs]]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: across ranks every sample is
    drawn exactly once, with no padding (shards differ in length by at most one).

    Unlike ``DistributedSampler``, which repeats samples to even out the ranks, this keeps
    validation metrics exact; sum correct counts and sample counts across ranks.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(0, math.ceil((self.num_samples - self.rank) / self.world_size))

    def __iter__(self):
        return iter(range(self.rank, self.num_samples, self.world_size))
