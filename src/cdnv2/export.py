"""Export a compact model to TorchScript and ONNX, and check each file's outputs.

Both exporters see the plain module-by-module path of the compact layers: the fused
inference path (preallocated block buffers, in-place writes, cached folded weights)
runs only in eager mode under ``no_grad``, so exporting under ``enable_grad`` with
frozen parameters records ordinary operators (index_select, grouped conv, reshape +
transpose for the shuffles, index_add for the SFR) with the same math.

ONNX goes through ``torch.onnx.export(..., dynamo=True)``: the TorchScript-based
exporter refuses ``index_add`` with repeated indices (SPEC 6), which the SFR needs.
onnx, onnxscript and onnxruntime are the optional extra ``cdnv2[export]``.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("none", "torchscript", "onnx", "all")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'cdnv2[export]'"


class ExportError(UserError):
    """An export that cannot run (missing extra) or whose file disagrees with PyTorch."""


@dataclass
class ExportCheck:
    format: str
    path: str
    max_abs_diff: float  # over the check batches, against the PyTorch model
    output_scale: float  # max |output| of the PyTorch model on the same inputs
    batch_sizes: list[int]
    ok: bool
    file_bytes: int
    op_types: dict[str, int] = field(default_factory=dict)  # ONNX: operator histogram

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def formats_for(choice: str) -> list[str]:
    if choice not in FORMATS:
        raise ExportError(f"export={choice!r}: use one of {', '.join(FORMATS)}")
    if choice == "none":
        return []
    return ["torchscript", "onnx"] if choice == "all" else [choice]


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def require_onnx() -> None:
    missing = missing_onnx_packages()
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)} (not installed): {INSTALL_HINT}"
        )


def _exportable_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode with frozen parameters and trace-safe index reads.

    Compact layers cache an int64 copy of their small-int index keyed on the buffer's
    data pointer, which fake tensors (torch.export) do not have; the copy reads the
    buffer directly. The user's model is left as it is.
    """
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    for m in clone.modules():
        buffer = getattr(type(m), "_index_buffer", None)
        if buffer is not None and hasattr(m, "long_index"):
            m.long_index = functools.partial(_read_index, m, buffer)
    return clone


def _read_index(module: nn.Module, buffer: str) -> torch.Tensor:
    return getattr(module, buffer).long()


@torch.no_grad()
def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x).float()
    finally:
        model.train(was_training)


def _tolerance(scale: float) -> float:
    return 1e-4 * max(1.0, scale)


def check_inputs(input_size: tuple[int, int, int], batch_sizes=(1, 3), seed: int = 0) -> list[torch.Tensor]:
    """Random images at batch sizes other than the traced one: dynamic batch is checked too."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *input_size, generator=g) for b in batch_sizes]


def _compare(fmt: str, path: Path, model: nn.Module, inputs: list[torch.Tensor], run) -> ExportCheck:
    diff, scale = 0.0, 0.0
    for x in inputs:
        ref = _reference(model, x)
        got = torch.as_tensor(run(x)).float()
        if got.shape != ref.shape:
            raise ExportError(f"{fmt} file {path} gives outputs of shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        diff = max(diff, float((got - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return ExportCheck(
        format=fmt, path=str(path), max_abs_diff=diff, output_scale=scale,
        batch_sizes=[int(x.shape[0]) for x in inputs], ok=diff <= _tolerance(scale),
        file_bytes=path.stat().st_size,
    )


# ----------------------------------------------------------------------------- TorchScript
def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Trace ``model`` on ``example`` and save it; the batch axis stays dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the file is checked after
        traced = torch.jit.trace(_exportable_copy(model), example, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def check_torchscript(path: str | Path, model: nn.Module, inputs: list[torch.Tensor]) -> ExportCheck:
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(x):
        with torch.no_grad():
            return loaded(x)

    return _compare("torchscript", path, model, inputs, run)


# ----------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int | None = None) -> Path:
    """Export with the dynamo exporter, batch axis dynamic, inputs ``images``, outputs ``logits``."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {"opset_version": opset} if opset else {}
    # The exporter reports progress on stdout; keep the command's output to our table.
    clone = _exportable_copy(model)
    with torch.enable_grad(), warnings.catch_warnings(), _quiet_loggers(), \
            contextlib.redirect_stdout(io.StringIO()) as chatter:
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                clone, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: batch},), external_data=False, **kwargs,
            )
        except Exception as e:
            log.debug("exporter output:\n%s", chatter.getvalue())
            raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    program.save(str(path))
    return path


@contextlib.contextmanager
def _quiet_loggers(names=("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")):
    """The exporter's optimizer logs every rewrite at INFO; keep the command's output to our tables."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.WARNING))
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_op_types(path: str | Path) -> dict[str, int]:
    """Histogram of ``domain::op`` (plain ``op`` for the standard domain) in the graph."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts: collections.Counter = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(m.graph)
    for fn in m.functions:  # local functions, if the exporter kept any
        for node in fn.node:
            counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(sorted(counts.items()))


def nonstandard_ops(op_types: dict[str, int]) -> list[str]:
    """Operators outside the standard ONNX domain (ATen fallbacks, custom functions)."""
    return [op for op in op_types if "::" in op or op.lower().startswith("aten")]


def check_onnx(path: str | Path, model: nn.Module, inputs: list[torch.Tensor]) -> ExportCheck:
    require_onnx()
    import onnxruntime as ort

    path = Path(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: x.numpy()})[0]

    check = _compare("onnx", path, model, inputs, run)
    check.op_types = onnx_op_types(path)
    odd = nonstandard_ops(check.op_types)
    if odd:
        check.ok = False
        log.warning("ONNX graph %s has non-standard operators: %s", path, ", ".join(odd))
    return check


def export_and_check(
    model: nn.Module, formats: list[str], stem: str | Path, input_size: tuple[int, int, int]
) -> list[ExportCheck]:
    """Write ``<stem>.torchscript.pt`` / ``<stem>.onnx`` and check each against ``model``."""
    if "onnx" in formats:
        require_onnx()  # fail before spending time on the TorchScript file
    stem = Path(stem)
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    inputs = check_inputs(input_size)
    checks = []
    for fmt in formats:
        if fmt == "torchscript":
            path = export_torchscript(model, example, stem.with_name(stem.name + ".torchscript.pt"))
            checks.append(check_torchscript(path, model, inputs))
        elif fmt == "onnx":
            path = export_onnx(model, example, stem.with_name(stem.name + ".onnx"))
            checks.append(check_onnx(path, model, inputs))
        else:
            raise ExportError(f"unknown export format {fmt!r}")
    return checks
