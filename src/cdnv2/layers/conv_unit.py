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


def bn_affine(bn: nn.Module, channels: int, like: torch.Tensor | None = None):
    """An eval-mode BN (or Identity) as per-channel float64 ``(scale, shift)``.

    ``bn(x) == scale * x + shift`` channel by channel: what the fused inference path and
    the deployment graph fold into neighbouring convs. None when the BN is not a fixed
    affine map (training mode, or no running statistics). ``like`` sets the device.
    """
    device = like.device if like is not None else None
    if isinstance(bn, nn.Identity):
        return (torch.ones(channels, dtype=torch.float64, device=device),
                torch.zeros(channels, dtype=torch.float64, device=device))
    # Any eval-mode BN with running statistics (SyncBatchNorm too) is a fixed affine map.
    if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
            or bn.running_mean is None or bn.running_var is None):
        return None
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift
