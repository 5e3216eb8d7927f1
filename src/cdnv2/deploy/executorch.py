"""ExecuTorch program (``.pte``) of a compact model with the XNNPACK delegate: phones, edge boards.

The program of :func:`cdnv2.deploy.program.export_program` is lowered with
``to_edge_transform_and_lower`` and the XNNPACK partitioner (every conv, BN, pool and
linear runs in XNNPACK's CPU kernels) for a fixed batch size: ExecuTorch plans its memory
ahead, and one image per call is the mobile case. Runs with ExecuTorch's runtime
(``executorch.runtime.Runtime`` in Python, ``executorch::extension::Module`` in C++ and
the Android/iOS bindings). The class names and preprocessing are in ``<file>.json`` beside it.

Needs the optional extra ``cdnv2[mobile]`` (executorch).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .program import export_program

INSTALL_HINT = "pip install 'cdnv2[mobile]'"


def require_executorch() -> None:
    from .export import ExportError

    if importlib.util.find_spec("executorch") is None:
        raise ExportError(f"export=executorch needs executorch (not installed): {INSTALL_HINT}")


def export_executorch(model: nn.Module, example: torch.Tensor, path: str | Path) -> tuple[Path, dict]:
    """Write the XNNPACK-delegated ``.pte`` of ``model`` for ``example``'s batch size; return
    (path, ``cdnv2.deploy.*`` metadata)."""
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program, meta = export_program(model, example, dynamic_batch=False, target="executorch")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(lowered.buffer)
    return path, {**meta, "cdnv2.executorch.batch": str(example.shape[0]), "cdnv2.executorch.delegate": "xnnpack"}


def executorch_session(path: str | Path):
    """``run(images) -> logits`` (torch tensors) for a ``.pte`` in ExecuTorch's runtime."""
    require_executorch()
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(x: torch.Tensor) -> torch.Tensor:
        return method.execute([x.contiguous()])[0]

    return run
