"""torchvision DenseNets behind the common model API, as training baselines."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ._registry import register_model


class TorchvisionDenseNet(nn.Module):
    """Wraps ``torchvision.models.densenetXXX`` (random init: no hub downloads)."""

    classifier_name = "net.classifier"  # the module reset_classifier replaces

    def __init__(self, variant: str, num_classes: int = 1000, memory_efficient: bool = False):
        super().__init__()
        self.variant = variant
        self.net = getattr(torchvision.models, variant)(
            weights=None, num_classes=num_classes, memory_efficient=memory_efficient
        )
        # torchvision's trunk ends at the BN norm5 and applies the final ReLU in forward; as a
        # child of the trunk (no weights: state dicts are unchanged) the deepest features_only
        # map is the activated one, as in timm's DenseNet.
        self.net.features.add_module("relu5", nn.ReLU())
        self.num_features = self.net.classifier.in_features
        self._kwargs = dict(num_classes=num_classes, memory_efficient=memory_efficient)
        self.feature_info = _block_info(self.net.features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.net.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.net.classifier = nn.Linear(self.num_features, num_classes)
        self._kwargs["num_classes"] = num_classes

    def arch_kwargs(self) -> dict:
        return dict(self._kwargs)


def _block_info(features: nn.Sequential) -> list[dict]:
    """Channels and reduction after each ``denseblockN`` (the last one after ``norm5`` and its ReLU)."""
    info, reduction, c = [], 1, 0
    for name, child in features.named_children():
        if isinstance(child, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            reduction *= child.stride if isinstance(child.stride, int) else child.stride[0]
            c = getattr(child, "out_channels", c)
        elif name.startswith("denseblock"):
            layers = list(child.children())
            c += sum(layer.conv2.out_channels for layer in layers)
            info.append(dict(num_chs=c, reduction=reduction, module=f"net.features.{name}"))
        elif name.startswith("transition"):
            c, reduction = child.conv.out_channels, reduction * 2
    info[-1]["module"] = "net.features.relu5"  # after the trunk's final BN + ReLU, as timm's DenseNet
    return info


@register_model
def densenet121(**kwargs) -> TorchvisionDenseNet:
    """torchvision DenseNet-121 (2.9G FLOPs, 8.0M params), randomly initialised."""
    return TorchvisionDenseNet("densenet121", **kwargs)


@register_model
def densenet169(**kwargs) -> TorchvisionDenseNet:
    """torchvision DenseNet-169 (3.4G FLOPs, 14.1M params), randomly initialised."""
    return TorchvisionDenseNet("densenet169", **kwargs)
