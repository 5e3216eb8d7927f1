"""CondenseNetV2 (CVPR 2021) and its predecessor CondenseNet (CVPR 2018).

One network class covers both: CondenseNet is CondenseNetV2 without sparse feature
reactivation, squeeze-excitation, hard-swish and the hidden head layer. Module names
follow the official release (``features.denseblock_1.denselayer_1.conv_1`` ...) so
its checkpoints map onto ours with a rename of the mask buffers only.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import LearnedGroupConv, LearnedLinear, PreActConv, SparseFeatureReactivation, SqueezeExcite, create_act
from ._registry import register_model


@dataclass(frozen=True)
class CondenseNetConfig:
    """Architecture of a CondenseNet(V2). Every field can be overridden per model."""

    stages: tuple[int, ...]  # dense layers per block
    growth: tuple[int, ...]  # growth rate per block
    num_classes: int = 1000
    in_chans: int = 3
    stem_stride: int = 2  # 2 for 224x224 ImageNet inputs, 1 for 32x32 inputs
    stem_channels: int | None = None  # default 2 * growth[0]
    bottleneck: int = 4  # LGC widens to bottleneck * growth channels
    lgc_groups: int = 8  # G of the learned group conv
    lgc_condense: int = 8  # C of the learned group conv
    conv3x3_groups: int = 8
    sfr: bool = True  # sparse feature reactivation on (V2) or off (V1)
    sfr_groups: int = 8
    sfr_condense: int = 8
    sfr_zero_init: bool = False  # start SFR as a no-op (BN weight 0); the release used 1
    se_from_block: int | None = 3  # SE on the 3x3 output for blocks >= this; None: never
    hswish_from_block: int | None = 2  # hard-swish for blocks >= this; None: ReLU only
    head_se_reduction: int | None = 16  # SE on the pooled features; None: none
    fc_channel: int | None = 1024  # hidden head width (hard-swish); None: linear head
    classifier_condense: int = 1  # >1: the classifier learns to read 1/C of its inputs (V1)

    def __post_init__(self):
        # YAML and JSON give lists; keep the config hashable and comparable.
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        object.__setattr__(self, "growth", tuple(int(g) for g in self.growth))
        if not self.stages or len(self.stages) != len(self.growth):
            raise ValueError(
                f"stages {self.stages} and growth {self.growth} must be non-empty and of equal length"
            )
        if min(self.stages) < 1 or min(self.growth) < 1:
            raise ValueError(f"stages {self.stages} and growth {self.growth} must be positive")
        for name in ("num_classes", "in_chans", "stem_stride", "bottleneck", "lgc_groups",
                     "lgc_condense", "conv3x3_groups", "sfr_groups", "sfr_condense",
                     "classifier_condense"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **overrides) -> "CondenseNetConfig":
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, self.field_names(), n=3)
                hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(
                f"unknown CondenseNet option(s) {', '.join(hints)}; "
                f"valid options: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"], d["growth"] = list(self.stages), list(self.growth)
        return d


class DenseLayer(nn.Module):
    """LGC 1x1 -> grouped 3x3 -> [SE] -> [SFR]; output concat([x (+ SFR), h])."""

    def __init__(self, in_channels: int, growth: int, cfg: CondenseNetConfig, act: str, se: bool):
        super().__init__()
        mid = cfg.bottleneck * growth
        self.conv_1 = LearnedGroupConv(
            in_channels, mid, groups=cfg.lgc_groups, condense_factor=cfg.lgc_condense, act=act
        )
        self.conv_2 = PreActConv(mid, growth, 3, groups=cfg.conv3x3_groups, act=act)
        self.se = SqueezeExcite(growth) if se else nn.Identity()
        self.sfr = (
            SparseFeatureReactivation(
                growth,
                in_channels,
                groups=cfg.sfr_groups,
                condense_factor=cfg.sfr_condense,
                act=act,
                zero_init=cfg.sfr_zero_init,
            )
            if cfg.sfr
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se(self.conv_2(self.conv_1(x)))
        if self.sfr is not None:
            x = self.sfr(x, h)  # the reactivated x replaces x in the concatenation
        return torch.cat([x, h], 1)


class CondenseNet(nn.Module):
    """CondenseNet(V2) with the common model API.

    ``forward_features`` -> (B, C, H, W) after the last BN-ReLU; ``forward_head`` pools,
    applies the head SE and the classifier; ``reset_classifier`` swaps the last layer.
    ``feature_info`` lists each dense block's output (channels, reduction, module) for
    ``create_model(..., features_only=True)``.
    """

    classifier_name = "classifier"  # the module reset_classifier replaces

    def __init__(self, cfg: CondenseNetConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.stem_channels or 2 * cfg.growth[0]
        reduction = cfg.stem_stride
        self.feature_info: list[dict] = []
        self.features = nn.Sequential()
        self.features.add_module(
            "init_conv", nn.Conv2d(cfg.in_chans, c, 3, stride=cfg.stem_stride, padding=1, bias=False)
        )
        last = len(cfg.stages) - 1
        for b, (n_layers, k) in enumerate(zip(cfg.stages, cfg.growth)):
            act = "hswish" if cfg.hswish_from_block is not None and b >= cfg.hswish_from_block else "relu"
            se = cfg.se_from_block is not None and b >= cfg.se_from_block
            block = nn.Sequential()
            for i in range(n_layers):
                block.add_module(f"denselayer_{i + 1}", DenseLayer(c, k, cfg, act, se))
                c += k
            self.features.add_module(f"denseblock_{b + 1}", block)
            # The last block's map is taken after the final BN-ReLU (= forward_features).
            tap = f"denseblock_{b + 1}" if b < last else "act_last"
            self.feature_info.append(dict(num_chs=c, reduction=reduction, module=f"features.{tap}"))
            if b < last:
                self.features.add_module(f"transition_{b + 1}", nn.AvgPool2d(2, stride=2))
                reduction *= 2
        self.features.add_module("norm_last", nn.BatchNorm2d(c))
        self.features.add_module("act_last", nn.ReLU(inplace=True))
        self.num_features = c
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.se_last = (
            SqueezeExcite(c, cfg.head_se_reduction) if cfg.head_se_reduction else nn.Identity()
        )
        if cfg.fc_channel:
            self.fc = nn.Linear(c, cfg.fc_channel)
            self.fc_act = create_act("hswish")
            self.head_hidden = cfg.fc_channel
        else:
            self.fc = nn.Identity()
            self.fc_act = nn.Identity()
            self.head_hidden = c
        self.classifier = self._make_classifier(cfg.num_classes)
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if self.cfg.classifier_condense > 1:
            return LearnedLinear(self.head_hidden, num_classes, condense_factor=self.cfg.classifier_condense)
        return nn.Linear(self.head_hidden, num_classes)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # After the generic loop, as the release's SFR BN was reset to 1 by it too.
        for m in self.modules():
            if isinstance(m, SparseFeatureReactivation):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.se_last(self.global_pool(x)).flatten(1)
        x = self.fc_act(self.fc(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.cfg = self.cfg.replace(num_classes=num_classes)
        self.classifier = self._make_classifier(num_classes)

    def arch_kwargs(self) -> dict:
        """Everything ``create_model`` needs to rebuild this architecture."""
        return self.cfg.to_dict()


def _create(base: CondenseNetConfig, overrides: dict) -> CondenseNet:
    return CondenseNet(base.replace(**overrides))


# ---------------------------------------------------------------- CondenseNetV2
_V2 = dict(stem_stride=2, bottleneck=4)


@register_model
def cdnv2_a(**overrides) -> CondenseNet:
    """CondenseNetV2-A: 46M FLOPs, 2.0M params, 64.4% ImageNet top-1 (paper)."""
    base = CondenseNetConfig(stages=(1, 1, 4, 6, 8), growth=(8, 8, 16, 32, 64), fc_channel=828, **_V2)
    return _create(base, overrides)


@register_model
def cdnv2_b(**overrides) -> CondenseNet:
    """CondenseNetV2-B: 146M FLOPs, 3.6M params, 71.9% ImageNet top-1 (paper)."""
    g = dict(lgc_groups=6, lgc_condense=6, conv3x3_groups=6, sfr_groups=6, sfr_condense=6)
    base = CondenseNetConfig(stages=(2, 4, 6, 8, 6), growth=(6, 12, 24, 48, 96), fc_channel=1024, **g, **_V2)
    return _create(base, overrides)


@register_model
def cdnv2_c(**overrides) -> CondenseNet:
    """CondenseNetV2-C: 309M FLOPs, 6.1M params, 75.9% ImageNet top-1 (paper)."""
    base = CondenseNetConfig(stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), fc_channel=1024, **_V2)
    return _create(base, overrides)


# 32x32 inputs: stride-1 stem, three blocks, ReLU in the first two, hard-swish in the last.
_V2_CIFAR = dict(
    stem_stride=1, num_classes=10, lgc_groups=4, lgc_condense=4, conv3x3_groups=4,
    sfr_groups=4, sfr_condense=4, se_from_block=None, hswish_from_block=2, fc_channel=None,
)


@register_model
def cdnv2_cifar_s14(**overrides) -> CondenseNet:
    """CondenseNetV2 for 32x32 inputs, 14-14-14 layers, growth 8-16-32, C=G=4.

    Not named after the paper's CIFAR models: their stage settings were never published.
    """
    base = CondenseNetConfig(stages=(14, 14, 14), growth=(8, 16, 32), **_V2_CIFAR)
    return _create(base, overrides)


@register_model
def cdnv2_cifar_s20(**overrides) -> CondenseNet:
    """CondenseNetV2 for 32x32 inputs, 20-20-20 layers, growth 8-16-32, C=G=4."""
    base = CondenseNetConfig(stages=(20, 20, 20), growth=(8, 16, 32), **_V2_CIFAR)
    return _create(base, overrides)


@register_model
def cdnv2_tiny(**overrides) -> CondenseNet:
    """A small CondenseNetV2 for 32x32 inputs that trains in a minute on a CPU (tests, demo)."""
    base = CondenseNetConfig(stages=(2, 3, 3), growth=(8, 16, 16), **_V2_CIFAR)
    return _create(base, overrides)


# ---------------------------------------------------------------- CondenseNet (V1)
_V1 = dict(
    sfr=False, se_from_block=None, hswish_from_block=None, head_se_reduction=None, fc_channel=None,
)
# The ImageNet CondenseNets also condense the classifier to half its inputs.
_V1_IMAGENET = dict(classifier_condense=2, **_V1)


@register_model
def condensenet_74_c4(**overrides) -> CondenseNet:
    """CondenseNet-74, C=G=4: 529M FLOPs, 4.8M params, 26.2% ImageNet top-1 error (paper)."""
    g = dict(lgc_groups=4, lgc_condense=4, conv3x3_groups=4)
    base = CondenseNetConfig(stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), **g, **_V1_IMAGENET)
    return _create(base, overrides)


@register_model
def condensenet_74_c8(**overrides) -> CondenseNet:
    """CondenseNet-74, C=G=8: 274M FLOPs, 2.9M params, 29.0% ImageNet top-1 error (paper)."""
    g = dict(lgc_groups=8, lgc_condense=8, conv3x3_groups=8)
    base = CondenseNetConfig(stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), **g, **_V1_IMAGENET)
    return _create(base, overrides)


def _cifar_v1(depth: int, overrides: dict) -> CondenseNet:
    s = (depth - 2) // 6
    base = CondenseNetConfig(
        stages=(s, s, s), growth=(8, 16, 32), stem_stride=1, num_classes=10,
        lgc_groups=4, lgc_condense=4, conv3x3_groups=4, **_V1,
    )
    return _create(base, overrides)


def _register_cifar_v1(depth: int) -> None:
    def builder(**overrides) -> CondenseNet:
        return _cifar_v1(depth, overrides)

    builder.__name__ = f"condensenet_{depth}"
    builder.__doc__ = f"CondenseNet-{depth} for CIFAR (stages {(depth - 2) // 6} x 3, growth 8-16-32, C=G=4)."
    register_model(builder)


for _depth in (50, 74, 86, 98, 110, 122):
    _register_cifar_v1(_depth)
