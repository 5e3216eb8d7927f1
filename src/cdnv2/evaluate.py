"""Top-1/top-5 evaluation that counts every validation sample exactly once."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    loss: float  # mean cross-entropy
    samples: int
    seconds: float
    confusion: Optional[torch.Tensor] = None  # (classes, classes) int64 counts, rows true, columns predicted

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "samples": self.samples,
            "images_per_second": self.images_per_second,
        }


@torch.no_grad()
def _score(logits: torch.Tensor, targets: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor | None) -> None:
    """Add one batch to ``sums`` (correct top-1, correct top-5, summed loss, images) and to
    the flattened confusion matrix ``counts`` when there is one; no host reads."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == targets[:, None]
    sums[0] += hit[:, 0].sum()
    sums[1] += hit.any(dim=1).sum()
    sums[2] += F.cross_entropy(logits, targets, reduction="sum")
    sums[3] += targets.numel()
    if counts is not None:
        c = logits.shape[1]
        # index_put_ has a deterministic CUDA kernel; bincount does not
        counts.index_put_((targets * c + top[:, 0],), torch.ones_like(targets, dtype=torch.int64), accumulate=True)


def evaluate(
    model: nn.Module,
    loader,
    device: torch.device | str = "cpu",
    *,
    reduce=None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress=None,
    confusion: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on ``loader``; ``reduce`` sums a tensor across ranks.

    ``confusion=True`` also counts the confusion matrix (rows: true class, columns: top-1
    prediction; CPU int64) into ``EvalResult.confusion``.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    start = time.perf_counter()
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    )
    counts = None
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with ctx:
            logits = model(images)
        c = logits.shape[1]
        if confusion and counts is None:
            counts = torch.zeros(c * c, dtype=torch.int64, device=device)
        _score(logits.float(), targets, sums, counts)
        if progress is not None:
            progress.update(1)
    if reduce is not None:
        sums = reduce(sums)
        counts = reduce(counts) if counts is not None else None
    model.train(was_training)
    n = max(1, int(sums[3].item()))
    return EvalResult(
        top1=100.0 * sums[0].item() / n,
        top5=100.0 * sums[1].item() / n,
        loss=sums[2].item() / n,
        samples=int(sums[3].item()),
        seconds=time.perf_counter() - start,
        confusion=counts.view(c, c).cpu() if counts is not None else None,
    )
