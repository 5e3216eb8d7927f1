"""The ``torch.export`` program of a compact model: what AOTInductor and ExecuTorch compile.

:func:`export_module` is the one place that decides which module is exported. Today it
is the deployment graph of :mod:`cdnv2.deploy.graph` (plain convolutions, BNs folded;
the forms chosen for ONNX Runtime, whose pre-activation BatchNorm Inductor fuses into the
next kernel): the compact model's own eager forward reads host values while it runs, so
a non-strict export of it specialises those reads and compiles to a slower graph
(docs/deploy.md). A model without a deployment form (a plain DenseNet, a masked model
before its last condensation step) is exported as it is.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .graph import DeployError, build_deploy_model

log = logging.getLogger(__name__)

MAX_BATCH = 4096


def export_module(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """The module whose graph is exported for ``model`` (eval mode, no gradients)."""
    try:
        return build_deploy_model(model, "onnxruntime", input_size=input_size)
    except DeployError as e:
        from .export import _exportable_copy

        log.info("exporting %s as it is (no deployment form: %s)", type(model).__name__, e)
        return _exportable_copy(model)


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """(``torch.export`` program of :func:`export_module` on ``example``, its ``cdnv2.deploy.*``
    metadata); the batch axis symbolic if asked.

    Exporters specialise a size-1 axis to the constant 1, so a dynamic batch is traced
    on two images.
    """
    module = export_module(model, tuple(example.shape[1:]))
    if dynamic_batch:
        example = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
        shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    else:
        shapes = None
    meta = module.metadata() if hasattr(module, "metadata") else {"cdnv2.deploy.runtime": "none"}
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=shapes), meta
