"""An embedded toy dataset: ten classes of 32x32 colour shapes and textures.

Generated in memory from a seed (vectorised, ~0.1 s for 12k images), so the quickstart
and the tests need no download and no files. Every image has a random background and
foreground colour, so the class is carried by geometry alone: a small CNN learns it to
well over 90% in a few CPU minutes, while a linear model on pixels stays far below.
"""
from __future__ import annotations

import math

import torch

SHAPES_CLASSES = (
    "circle", "square", "triangle", "ring", "plus", "cross",
    "h_stripes", "v_stripes", "checker", "diag_stripes",
)


def _masks(label: int, xx: torch.Tensor, yy: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Boolean foreground masks (n, size, size) for ``n`` images of one class."""
    n = xx.shape[0]

    def rand(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, generator=g))

    if label < 6:  # shapes: random radius, centre keeps the shape inside the image
        r = rand(0.17 * size, 0.4 * size)
        cx = r + torch.rand(n, 1, 1, generator=g) * (size - 2 * r)
        cy = r + torch.rand(n, 1, 1, generator=g) * (size - 2 * r)
        dx, dy = xx - cx, yy - cy
        if label == 0:
            return dx**2 + dy**2 <= r**2
        if label == 1:
            return torch.maximum(dx.abs(), dy.abs()) <= r * 0.85
        if label == 2:  # apex up, base at the bottom
            return (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.55)
        if label == 3:
            d2 = dx**2 + dy**2
            return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
        w = r * 0.3
        if label == 4:
            return ((dx.abs() <= w) & (dy.abs() <= r)) | ((dy.abs() <= w) & (dx.abs() <= r))
        u, v = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
        lim = r * 1.1
        return ((u.abs() <= w) & (v.abs() <= lim)) | ((v.abs() <= w) & (u.abs() <= lim))
    # textures: random period and phase over the whole image
    freq = 2 * math.pi / rand(4.0, 9.0)
    phase = rand(0.0, 2 * math.pi)
    if label == 6:
        return torch.sin(yy * freq + phase) > 0
    if label == 7:
        return torch.sin(xx * freq + phase) > 0
    if label == 8:
        return (torch.sin(xx * freq + phase) > 0) ^ (torch.sin(yy * freq + phase) > 0)
    sign = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)  # both diagonals
    return torch.sin((xx + sign * yy) * freq / math.sqrt(2) + phase) > 0


def make_shapes(num: int, seed: int, size: int = 32, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images as a uint8 tensor (num, 3, size, size) and int64 labels (num,).

    Balanced (class counts differ by at most one) and a pure function of its arguments.
    """
    if num < 1 or size < 8:
        raise ValueError(f"make_shapes: need num >= 1 and size >= 8, got num={num}, size={size}")
    g = torch.Generator().manual_seed(seed)
    num_classes = len(SHAPES_CLASSES)
    labels = (torch.arange(num) % num_classes)[torch.randperm(num, generator=g)]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    mask = torch.zeros(num, size, size, dtype=torch.bool)
    for label in range(num_classes):
        idx = (labels == label).nonzero().squeeze(1)
        if idx.numel():
            yy = coords.view(1, size, 1).expand(idx.numel(), size, size)
            xx = coords.view(1, 1, size).expand(idx.numel(), size, size)
            mask[idx] = _masks(label, xx, yy, g, size)
    # Every channel of the foreground differs from the background by 0.3-0.7 (mod 1):
    # always visible, never informative of the class.
    bg = torch.rand(num, 3, 1, 1, generator=g)
    fg = (bg + 0.3 + 0.4 * torch.rand(num, 3, 1, 1, generator=g)) % 1.0
    images = torch.where(mask.unsqueeze(1), fg, bg)
    images = images + noise * torch.randn(images.shape, generator=g)
    images = (images.clamp_(0, 1) * 255).round_().to(torch.uint8)
    return images, labels


def shape_masks(label: int, num: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean masks (num, size, size) of class ``label`` (0-5 are objects, 6-9 textures),
    as drawn in the shapes images; for building other tasks (e.g. detection) on them."""
    if not 0 <= label < len(SHAPES_CLASSES):
        raise ValueError(f"shape_masks: label must be in 0..{len(SHAPES_CLASSES) - 1}, got {label}")
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy = coords.view(1, size, 1).expand(num, size, size)
    xx = coords.view(1, 1, size).expand(num, size, size)
    return _masks(label, xx, yy, generator, size)
