"""Squeeze-and-excitation as used by CondenseNetV2 (no biases, sigmoid gate)."""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Global average pool -> linear -> ReLU -> linear -> sigmoid -> channel scale.

    The linear layers carry no bias, as in the official release, and are kept in an
    ``fc`` Sequential so that official keys (``se.fc.0.weight``, ``se.fc.2.weight``)
    map one to one.
    """

    def __init__(self, channels: int, reduction: int = 1):
        super().__init__()
        if reduction < 1 or channels < reduction:
            raise ValueError(f"SqueezeExcite: bad reduction={reduction} for channels={channels}")
        hidden = channels // reduction  # floor, as in the release (1176 // 16 = 73 for B)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc(self.pool(x).flatten(1))
        return x * scale[:, :, None, None]
