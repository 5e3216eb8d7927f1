"""Batch-level mixup / CutMix with soft targets (called by the trainer, not the loader)."""
from __future__ import annotations

import math
import random
from typing import Optional

import torch
import torch.nn.functional as F


def mixup_cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with its reverse, as timm's ``Mixup(mode="batch")``.

    One mixing coefficient ``lam ~ Beta(alpha, alpha)`` per batch; when both alphas are
    positive, mixup or CutMix is chosen with probability 1/2. Returns new images and soft
    targets ``(B, num_classes)``; with both alphas 0 the images come back unchanged and the
    targets one-hot. ``targets`` may be class indices or soft targets already. All
    randomness comes from ``generator`` (the global RNG if None), so a seeded generator
    gives the same mix on every run. Label smoothing stays with the loss
    (``F.cross_entropy(label_smoothing=...)`` accepts soft targets).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_cutmix: alphas must be >= 0, got mixup={mixup_alpha}, cutmix={cutmix_alpha}")
    if targets.ndim == 1:
        soft = F.one_hot(targets.long(), num_classes).to(images.dtype)
    else:
        soft = targets.to(images.dtype)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, soft
    device = generator.device if generator is not None else torch.device("cpu")
    # Python's random has Beta sampling that takes a seed; torch's Beta takes no generator.
    rng = random.Random(int(torch.randint(2**62, (), generator=generator, device=device)))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    lam = rng.betavariate(*(2 * [cutmix_alpha if use_cutmix else mixup_alpha]))
    partner = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = rng.randrange(h), rng.randrange(w)
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = images.clone()
        mixed[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)  # the area actually kept
    else:
        mixed = images * lam + partner * (1.0 - lam)
    return mixed, soft * lam + soft.flip(0) * (1.0 - lam)
