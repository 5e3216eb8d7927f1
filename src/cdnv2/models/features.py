"""Multi-scale feature maps: any registered model as a backbone (timm ``features_only``).

A model describes its dense blocks in ``model.feature_info``: one dict per block with
``num_chs``, ``reduction`` (input size / map size) and ``module``, the dotted name of the
trunk child whose output is the block's map. The last block's entry names the trunk's
last child (its final norm + activation), so for every registered model the deepest map
equals ``forward_features`` (timm's DenseNet does the same; tests/test_features.py checks
it for every model). :class:`FeatureListNet` runs the trunk child by child and returns the
maps after the selected blocks. It relies only on those child names, so it works
unchanged for masked, compact-training and compact models: conversion swaps modules
inside the blocks (and retypes the containers) but keeps every name and width.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["FeatureInfo", "FeatureListNet", "features_only"]


class FeatureInfo:
    """Channels, reductions and module names of the selected outputs (timm's API)."""

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(d) for d in info]
        self.out_indices = tuple(out_indices)

    def _get(self, key: str, idx: int | Sequence[int] | None):
        selected = [self.info[i][key] for i in self.out_indices]
        if idx is None:
            return selected
        if isinstance(idx, int):
            return selected[idx]
        return [selected[i] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        return [dict(self.info[i]) for i in self.out_indices]

    def __len__(self) -> int:
        return len(self.out_indices)

    def __getitem__(self, i: int) -> dict:
        return dict(self.info[self.out_indices[i]])

    def __repr__(self) -> str:
        return f"FeatureInfo(channels={self.channels()}, reduction={self.reduction()})"


def _normalize(out_indices: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if out_indices is None:
        return tuple(range(n))
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    idx = []
    for i in out_indices:
        if not -n <= int(i) < n:
            raise ValueError(f"out_indices {tuple(out_indices)}: {i} is not a block index; the model has "
                             f"{n} dense blocks (valid: 0..{n - 1} or -{n}..-1)")
        idx.append(int(i) % n)
    if len(set(idx)) != len(idx) or idx != sorted(idx):
        raise ValueError(f"out_indices {tuple(out_indices)} must be distinct and in increasing block order")
    return tuple(idx)


class FeatureListNet(nn.Module):
    """The trunk of ``model`` returning a list of block maps (no pooling, no head).

    The trunk is held under the name it has in the model when that is ``features``
    (CondenseNet), so its state-dict keys are the classifier model's keys minus the
    head. ``forward`` stops after the last selected block.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not info:
            raise ValueError(f"{type(model).__name__} has no feature_info: it cannot be a features_only backbone")
        trunk_names = {d["module"].rpartition(".")[0] for d in info}
        if len(trunk_names) != 1:
            raise ValueError(f"feature_info modules must share one trunk, got {sorted(trunk_names)}")
        self.trunk_name = trunk_names.pop()
        self.features = model.get_submodule(self.trunk_name)
        self.out_indices = _normalize(out_indices, len(info))
        self.feature_info = FeatureInfo(info, self.out_indices)
        self._taps = [info[i]["module"].rpartition(".")[2] for i in self.out_indices]
        for key in ("cfg", "cdnv2_meta"):
            if hasattr(model, key):
                setattr(self, key, getattr(model, key))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Child by child, not ``self.features(x)``: the maps between children are the output.
        outs, wanted = [], set(self._taps)
        for name, child in self.features.named_children():
            x = child(x)
            if name in wanted:
                outs.append(x)
                if len(outs) == len(self._taps):
                    break
        return outs


def features_only(model: nn.Module, out_indices: Sequence[int] | None = None) -> FeatureListNet:
    """Wrap a built (or loaded, or converted) model as a multi-scale backbone."""
    return FeatureListNet(model, out_indices)
