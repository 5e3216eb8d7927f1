"""AOTInductor package (``.pt2``) of a compact model: one compiled graph, no Python needed.

The program of :func:`cdnv2.deploy.program.export_program` (batch axis dynamic) is
compiled ahead of time by Inductor, with freezing (:data:`INDUCTOR_CONFIGS`), into a
shared library inside a ``.pt2`` package.
It loads with ``torch._inductor.aoti_load_package`` in a process that never imports
cdnv2, or from C++ with ``torch::inductor::AOTIModelPackageLoader`` (docs/deploy.md).
The class names and the eval preprocessing are in the package's metadata
(``cdnv2.class_names``, ``cdnv2.preprocess``: JSON strings) and in ``<file>.json``
beside it, like the ONNX and OpenVINO files.

Compiling takes a while (about a minute for cdnv2_tiny on a busy 2-core machine):
Inductor generates and compiles C++ for every kernel. Its cache
(``/tmp/torchinductor_<user>``, ``TORCHINDUCTOR_CACHE_DIR``) makes a second export of the
same graph faster.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .program import export_program

log = logging.getLogger(__name__)

# Inductor's freezing: weights become constants of the graph, the convolutions get
# weights prepacked for oneDNN and constant subexpressions are folded at compile time.
# cdnv2_a, batch 1, one thread, quiet machine (the .pt2 timed round-robin): 15.2 ms
# without, 8.8 ms with (docs/deploy.md, "The .pt2 and .pte").
INDUCTOR_CONFIGS = {"freezing": True}


def package_metadata(class_names=None, preprocess=None, meta: dict | None = None) -> dict[str, str]:
    """String metadata stored in the package (AOTInductor keeps str -> str only)."""
    out = {"cdnv2.class_names": json.dumps(class_names), "cdnv2.preprocess": json.dumps(preprocess)}
    out.update({k: str(v) for k, v in (meta or {}).items()})
    return out


def export_aoti(model: nn.Module, example: torch.Tensor, path: str | Path, *,
                class_names: list[str] | None = None, preprocess: dict | None = None) -> Path:
    """Compile ``model`` into the AOTInductor package ``path`` (.pt2), batch axis dynamic."""
    from .export import ExportError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program, meta = export_program(model, example, dynamic_batch=True, target="aoti")
    config = {**INDUCTOR_CONFIGS, "aot_inductor.metadata": package_metadata(class_names, preprocess, meta)}
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=config)
    except Exception as e:  # a compiler failure on this machine (no C++ compiler, say)
        raise ExportError(f"AOTInductor compile failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                          "it needs a working C++ compiler (g++ or clang) on PATH") from e
    return path


def load_aoti(path: str | Path):
    """The package's callable: ``run(images) -> logits`` (torch tensors)."""
    return torch._inductor.aoti_load_package(str(path))


def aoti_metadata(path: str | Path) -> dict[str, str]:
    """The package's string metadata (compiler flags, and ours: ``cdnv2.*``)."""
    return dict(load_aoti(path).get_metadata())


class AOTIPackage(nn.Module):
    """A loaded ``.pt2`` as a module (CPU, inference only), for code that takes a model."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = str(path)
        self.runner = load_aoti(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x.contiguous())
