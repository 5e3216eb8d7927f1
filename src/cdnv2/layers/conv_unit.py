"""Pre-activation convolution unit: BN -> activation -> conv."""
from __future__ import annotations

import torch
from torch import nn

from .activations import create_act


class PreActConv(nn.Module):
    """BN(in) -> act -> conv(in -> out, k x k, groups), no bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        act: str = "relu",
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                raise ValueError(f"PreActConv: {name}={value} is not divisible by groups={groups}")
        self.norm = nn.BatchNorm2d(in_channels)
        self.act = create_act(act)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))
