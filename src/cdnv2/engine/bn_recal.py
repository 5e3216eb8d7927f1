"""Re-estimate BatchNorm statistics after a condensation step.

A condensation step zeroes a share of every LGC/SFR layer's connections at once, so the
activations each BatchNorm sees afterwards have other means and variances than the
running statistics it collected before. Evaluated with the stale statistics, the model
falls to near chance (docs/recipes.md has the measurement) although the weights are
fine: a few hundred training images through the model in train mode, without
gradients, give statistics that fit the pruned network (torch.optim.swa_utils.update_bn,
timm's ``--bn-recal``).

The batches come from the training set through the train loader's seeded sampler and
per-sample augmentation seeds, keyed by the run's seed and the optimizer step: a resumed
run and an uninterrupted one re-estimate from the same images, and the checkpoint of
the step is written after it. Under torchrun every rank reads its own share of the
batches and the statistics are then averaged across ranks (means, and variances around
the global mean), so every rank ends with the same numbers.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..data.loaders import CheckedLoader, Data
from ..data.samplers import TrainBatchSampler, mix_seed
from .distributed import all_reduce_sum

_RECAL_STREAM = 11  # mix_seed stream of the recalibration batches (others: data order, shapes, ...)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(
    models: Sequence[nn.Module],
    batches: Iterable[torch.Tensor],
    *,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], object] = nullcontext,
) -> int:
    """Replace the running statistics of every BatchNorm of ``models`` by those of ``batches``.

    Each batch goes through every model (one decode for the live model and its EMA). Only
    the BatchNorm layers are put in train mode, with a cumulative average (``momentum=None``),
    so every batch counts alike; modes and momenta are restored afterwards. ``average``
    (optional) averages a tensor across ranks. Returns the number of images used (this rank).
    """
    saved = []
    for model in models:
        modes = {m: m.training for m in model.modules()}
        bns = batchnorms(model)
        saved.append((model, modes, {bn: bn.momentum for bn in bns}))
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
    seen = 0
    try:
        for images in batches:
            with autocast():
                for model in models:
                    model(images)
            seen += images.shape[0]
    finally:
        for model, modes, momenta in saved:
            for m, training in modes.items():
                m.training = training
            for bn, momentum in momenta.items():
                bn.momentum = momentum
    if average is not None:
        for model in models:
            _average_stats(batchnorms(model), average)
    return seen


def _average_stats(bns, average) -> None:
    """Pool per-rank statistics of equal-sized shares: var = E[var_r + mean_r^2] - mean^2."""
    for bn in bns:
        mean = bn.running_mean.double()
        second = bn.running_var.double() + mean * mean
        pooled_mean, pooled_second = average(mean), average(second)
        bn.running_mean.copy_(pooled_mean)
        bn.running_var.copy_((pooled_second - pooled_mean * pooled_mean).clamp_min(0))


def recal_loader(data: Data, *, seed: int, step: int, num_batches: int, epoch: int) -> CheckedLoader:
    """``num_batches`` training batches of this rank, fixed by (seed, step): the train
    loader's dataset and augmentation, another permutation than the training order."""
    train = data.train_sampler
    sampler = TrainBatchSampler(
        train.num_samples, train.batch_size, seed=mix_seed(seed, _RECAL_STREAM, step),
        rank=train.rank, world_size=train.world_size,
    )
    sampler.set_epoch(epoch, start_batch=max(0, sampler.steps_per_epoch - num_batches))
    loader = data.train_loader
    return CheckedLoader(loader.dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                         pin_memory=loader.pin_memory, generator=torch.Generator().manual_seed(seed),
                         worker_init_fn=loader.worker_init_fn)


def recalibrate_after_condense(t) -> int:
    """Trainer hook: re-estimate the BN statistics of the live model and its EMA after the
    condensation step just applied, or before an evaluation while weights fade towards a
    step (``condense.fade_fraction``), from ``condense.bn_recal_batches`` batches (0: off).
    Returns the images used on this rank (0 when off)."""
    num_batches = t.cfg.condense.bn_recal_batches
    if not num_batches:
        return 0
    loader = recal_loader(t.data, seed=t.cfg.seed, step=t.step, num_batches=num_batches, epoch=t.epoch)

    def batches():
        for images, _ in loader:
            images = images.to(t.device, non_blocking=True)
            if t.cfg.trainer.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images

    def autocast():
        return torch.autocast(t.device.type, dtype=t.autocast_dtype) if t.autocast_dtype else nullcontext()

    def average(x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x, t.dist) / t.dist.world_size

    models = [t.model] + ([t.ema.module] if t.ema is not None else [])
    return recalibrate_bn(models, batches(), average=average if t.dist.enabled else None, autocast=autocast)
