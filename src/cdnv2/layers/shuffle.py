"""Channel permutations between interleaved and group-contiguous orders.

CondenseNet assigns channel ``i`` to group ``i % G`` (interleaved). Grouped
convolutions want group ``g`` to own the contiguous block ``[g*n, (g+1)*n)``.
"""
from __future__ import annotations

import torch


def interleaved_to_grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Reorder channels so that channel ``d*G + g`` moves to ``g*n + d``."""
    b, c, h, w = x.shape
    return x.view(b, c // groups, groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def grouped_to_interleaved(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_grouped` (the classic channel shuffle)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def interleaved_to_grouped_index(channels: int, groups: int) -> torch.Tensor:
    """Index ``p`` with ``grouped[j] = interleaved[p[j]]``."""
    return torch.arange(channels).view(channels // groups, groups).t().reshape(-1)
