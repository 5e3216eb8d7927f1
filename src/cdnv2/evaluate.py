"""Top-1/top-5 evaluation that counts every validation sample exactly once."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

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
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device | str = "cpu",
    *,
    reduce=None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress=None,
) -> EvalResult:
    """Evaluate ``model`` on ``loader``; ``reduce`` sums a tensor across ranks."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    start = time.perf_counter()
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    )
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with ctx:
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == targets[:, None]
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
        if progress is not None:
            progress.update(1)
    if reduce is not None:
        sums = reduce(sums)
    model.train(was_training)
    n = max(1, int(sums[3].item()))
    return EvalResult(
        top1=100.0 * sums[0].item() / n,
        top5=100.0 * sums[1].item() / n,
        loss=sums[2].item() / n,
        samples=int(sums[3].item()),
        seconds=time.perf_counter() - start,
    )
