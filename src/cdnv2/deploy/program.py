"""The ``torch.export`` program of a compact model: what AOTInductor and ExecuTorch compile.

:func:`export_module` is the one place that decides which module is exported, per target:

- ``"aoti"`` (Inductor): the compact model itself, whose forward under tracing is the
  static path of :mod:`cdnv2.compact.static_run` (block buffers, folds stored as
  buffers, no host reads). Compiled by Inductor it ran faster than the compiled
  deployment graph on cdnv2_a at batch 1 and 32 (docs/deploy.md; one noisy cdnv2_b
  batch-1 run had it slower);
- ``"executorch"`` (XNNPACK): the deployment graph of :mod:`cdnv2.deploy.graph` (plain
  convolutions, BNs folded), which XNNPACK delegates; the static path's batched GEMMs
  and index ops would run outside the delegate.

A model without a deployment form (a plain DenseNet, a masked model before its last
condensation step) is exported as it is.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .graph import DeployError, build_deploy_model

log = logging.getLogger(__name__)

MAX_BATCH = 4096
TARGETS = ("aoti", "executorch")


def _static_ready(model: nn.Module) -> bool:
    """Every dense layer of a compact model has its static path folded (eval mode)."""
    from ..compact import CompactDenseLayer

    layers = [m for m in model.modules() if isinstance(m, CompactDenseLayer)]
    return bool(layers) and all(layer.static_ready for layer in layers)


def export_module(model: nn.Module, input_size: tuple[int, int, int], target: str = "aoti") -> nn.Module:
    """The module whose graph is exported for ``model`` and ``target`` (eval mode, no gradients)."""
    from .export import _exportable_copy

    if target not in TARGETS:
        raise ValueError(f"export_module: target {target!r} is not one of {TARGETS}")
    if target == "aoti":
        clone = _exportable_copy(model)  # eval(): the copy folds its static buffers
        if _static_ready(clone):
            return clone
    try:
        return build_deploy_model(model, "onnxruntime", input_size=input_size)
    except DeployError as e:
        log.info("exporting %s as it is (no deployment form: %s)", type(model).__name__, e)
        return _exportable_copy(model)


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True, target: str = "aoti"):
    """(``torch.export`` program of :func:`export_module` on ``example``, its ``cdnv2.deploy.*``
    metadata); the batch axis symbolic if asked.

    Exporters specialise a size-1 axis to the constant 1, so a dynamic batch is traced
    on two images.
    """
    module = export_module(model, tuple(example.shape[1:]), target)
    if dynamic_batch:
        example = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
        shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    else:
        shapes = None
    if hasattr(module, "metadata"):
        meta = module.metadata()
    elif _static_ready(module):
        meta = {"cdnv2.deploy.runtime": "inductor", "cdnv2.deploy.summary": "compact model, static forward"}
    else:
        meta = {"cdnv2.deploy.runtime": "none"}
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=shapes), meta
