"""torchvision DenseNets behind the common model API, as training baselines."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ._registry import register_model


class TorchvisionDenseNet(nn.Module):
    """Wraps ``torchvision.models.densenetXXX`` (random init: no hub downloads)."""

    def __init__(self, variant: str, num_classes: int = 1000, memory_efficient: bool = False):
        super().__init__()
        self.variant = variant
        self.net = getattr(torchvision.models, variant)(
            weights=None, num_classes=num_classes, memory_efficient=memory_efficient
        )
        self.num_features = self.net.classifier.in_features
        self._kwargs = dict(num_classes=num_classes, memory_efficient=memory_efficient)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net.features(x))

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


@register_model
def densenet121(**kwargs) -> TorchvisionDenseNet:
    """torchvision DenseNet-121 (2.9G FLOPs, 8.0M params), randomly initialised."""
    return TorchvisionDenseNet("densenet121", **kwargs)


@register_model
def densenet169(**kwargs) -> TorchvisionDenseNet:
    """torchvision DenseNet-169 (3.4G FLOPs, 14.1M params), randomly initialised."""
    return TorchvisionDenseNet("densenet169", **kwargs)
