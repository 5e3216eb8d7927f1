"""Masked 1x1 convolutions that learn their sparsity: LGC and SFR (SPEC sections 3-4).

Both layers are BN -> act -> 1x1 conv with a 0/1 ``mask`` of the weight's shape and a
``stage`` counter. Channels are assigned to ``G`` groups by ``index % G`` (interleaved);
for LGC the groups are formed over the conv's *outputs* and each group prunes its
*inputs*, for SFR the groups are formed over the *inputs* and each group prunes the
*outputs* it writes. Pruning happens only through :meth:`condense_step`, called by the
trainer; ``forward`` has no side effects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import create_act


def check_condense_sizes(name: str, grouped: int, pruned: int, groups: int, condense_factor: int) -> None:
    """ValueError naming ``name`` unless ``groups`` divides the grouped side and
    ``condense_factor`` the pruned side (shared by the masked and compact layers)."""
    if groups < 1 or condense_factor < 1:
        raise ValueError(f"{name}: groups={groups} and condense_factor={condense_factor} must be >= 1")
    if grouped % groups:
        raise ValueError(f"{name}: {grouped} grouped channels are not divisible by groups={groups}")
    if pruned % condense_factor:
        raise ValueError(
            f"{name}: {pruned} prunable channels are not divisible by condense_factor={condense_factor}"
        )


class CondensingConv1x1(nn.Module):
    """Shared machinery of :class:`LearnedGroupConv` and :class:`SparseFeatureReactivation`."""

    # Weight axis whose index modulo G gives a channel's group (0 = outputs, 1 = inputs).
    group_axis: int = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        condense_factor: int,
        act: str | None = "relu",
        bias: bool = False,
    ):
        super().__init__()
        grouped, pruned = (
            (out_channels, in_channels) if self.group_axis == 0 else (in_channels, out_channels)
        )
        check_condense_sizes(type(self).__name__, grouped, pruned, groups, condense_factor)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.condense_factor = condense_factor
        # act=None: a plain masked conv (the condensed classifier of CondenseNet V1).
        self.norm = nn.BatchNorm2d(in_channels) if act else nn.Identity()
        self.act = create_act(act) if act else nn.Identity()
        self.act_name = act
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.register_buffer("mask", torch.ones_like(self.conv.weight))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------- structure
    @property
    def num_steps(self) -> int:
        """Number of condensation steps until the layer keeps 1/C of its connections."""
        return self.condense_factor - 1

    @property
    def fully_condensed(self) -> bool:
        return int(self.stage) >= self.num_steps

    @property
    def density(self) -> float:
        """Fraction of the weight's connections that are still alive."""
        return float(self.mask.mean())

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """(O, I[, 1, 1]) -> (G, members, prunable) with member channels of one group."""
        t = t.reshape(self.out_channels, self.in_channels)
        if self.group_axis == 1:
            t = t.t()
        grouped, pruned = t.shape
        return t.reshape(grouped // self.groups, self.groups, pruned).transpose(0, 1)

    def group_mask(self) -> torch.Tensor:
        """Boolean (G, prunable) mask: which channels each group still connects to."""
        return self._grouped(self.mask).amax(1) > 0

    def kept_indices(self) -> torch.Tensor:
        """(G, prunable/C) long tensor: the channels each group keeps, ascending.

        Only defined once the layer is fully condensed (every group keeps exactly 1/C).
        """
        if not self.fully_condensed:
            raise RuntimeError(
                f"{type(self).__name__} is at stage {int(self.stage)} of {self.num_steps}; "
                "it has no final index structure yet"
            )
        gm = self.group_mask()
        return gm.nonzero()[:, 1].view(self.groups, -1)

    def _expand(self, gm: torch.Tensor) -> torch.Tensor:
        """(G, prunable) group mask -> a 0/1 tensor of the weight's shape."""
        gm = gm.to(self.mask.dtype)
        members = (self.out_channels if self.group_axis == 0 else self.in_channels) // self.groups
        full = gm.repeat(members, 1)  # row d*G + g holds group g: the interleaved order
        if self.group_axis == 1:
            full = full.t()
        return full.reshape_as(self.mask)

    def _set_group_mask(self, gm: torch.Tensor) -> None:
        self.mask.copy_(self._expand(gm))

    def masked_weight(self) -> torch.Tensor:
        return self.conv.weight * self.mask

    # ----------------------------------------------------------------- pruning
    @torch.no_grad()
    def condense_step(self) -> None:
        """Drop the next 1/C of every group's channels: the least important alive ones.

        Importance of a prunable channel for group g is the summed |W * M| over the
        group's members. Dropped channels sort first (importance -1), so each step
        removes exactly ``prunable / C`` more channels per group.
        """
        self._set_group_mask(self._next_group_mask())
        self.stage += 1

    def _next_group_mask(self) -> torch.Tensor:
        """The (G, prunable) group mask that the next :meth:`condense_step` would set."""
        if self.fully_condensed:
            raise RuntimeError(
                f"{type(self).__name__} is already fully condensed (stage {int(self.stage)})"
            )
        importance = self._grouped(self.masked_weight().abs()).sum(1)  # (G, prunable)
        importance = importance.masked_fill(~self.group_mask(), -1.0)
        n_drop = (int(self.stage) + 1) * (importance.shape[1] // self.condense_factor)
        order = importance.argsort(dim=1, stable=True)
        gm = torch.ones_like(importance, dtype=torch.bool)
        gm.scatter_(1, order[:, :n_drop], False)
        return gm

    @torch.no_grad()
    def fade_step(self, factor: float) -> None:
        """Scale the weights of the connections the next :meth:`condense_step` would drop
        by ``factor`` (the gentle step: they fade out over a few optimizer steps before the
        mask removes them). Masks and stage are left alone."""
        dropping = self.mask - self._expand(self._next_group_mask())  # 1 where alive now, dropped next
        self.conv.weight.mul_(1.0 - (1.0 - factor) * dropping)

    def lasso_penalty(self) -> torch.Tensor:
        """Group lasso: sum over (group, prunable channel) of the L2 norm of its weights."""
        w = self._grouped(self.masked_weight())
        return w.pow(2).sum(1).clamp_min(1e-6).sqrt().sum()

    def cost(self, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
        """(paper-rule, as-executed) multiply-adds of the masked 1x1 conv itself.

        BN and activation run as child modules and are counted there.
        """
        x = inputs[-1]  # LGC: (x,); SFR: (x, h) and the conv reads h
        pixels = x[0, 0].numel() if x.dim() == 4 else 1  # LearnedLinear reads (B, C)
        dense = self.in_channels * self.out_channels * pixels
        return dense / self.condense_factor, dense

    def _masked_conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.act(self.norm(x)), self.masked_weight(), self.conv.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
            f"condense_factor={self.condense_factor}, act={self.act_name}"
        )


class LearnedGroupConv(CondensingConv1x1):
    """LGC: BN -> act -> masked 1x1 conv; output o belongs to group o % G."""

    group_axis = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._masked_conv(x)


class LearnedLinear(LearnedGroupConv):
    """A linear layer (on (B, C) inputs) that learns to read 1/C of its inputs.

    CondenseNet V1 halves its ImageNet classifier's inputs; the release did it at
    conversion time, which changes the outputs. Here it is an ordinary condensation
    step, so the compact model equals the masked one.
    """

    def __init__(self, in_features: int, out_features: int, *, condense_factor: int):
        super().__init__(
            in_features, out_features, groups=1, condense_factor=condense_factor, act=None, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._masked_conv(x[:, :, None, None]).flatten(1)


class SparseFeatureReactivation(CondensingConv1x1):
    """SFR: refreshes earlier features ``x`` from the new features ``h``.

    ``forward(x, h) = x + conv(act(BN(h)))`` with the masked conv k -> c; input i of
    the conv belongs to group i % G, each group keeps 1/C of the c outputs.
    """

    group_axis = 1

    def __init__(self, *args, zero_init: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.zero_init = zero_init

    def reset_parameters(self) -> None:
        """Start as a no-op when ``zero_init`` (BN weight 0), otherwise as BN's default."""
        nn.init.constant_(self.norm.weight, 0.0 if self.zero_init else 1.0)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + self._masked_conv(h)
