"""Export a compact model to TorchScript, ONNX, OpenVINO IR, AOTInductor and ExecuTorch,
and check each file.

TorchScript traces the compact model itself (its eager path is the fast one in
PyTorch). ONNX and OpenVINO get the deployment form of :mod:`cdnv2.deploy.graph`: plain
convolutions with the BNs folded, LGCs as dense or gathered grouped 1x1 convs chosen per
layer for the target runtime, the SFR as a 1x1 conv + Add. It goes through the
TorchScript-based ONNX exporter (it has no scatter to refuse, and it exports cdnv2_b in
~1 s against ~30 s for the dynamo exporter). A model without that form (a masked model
before its last condensation step, a plain DenseNet) is exported as it is with the
dynamo exporter. AOTInductor (:mod:`cdnv2.deploy.aoti`) and ExecuTorch
(:mod:`cdnv2.deploy.executorch`) compile the ``torch.export`` program of
:mod:`cdnv2.deploy.program`. Every file is checked against the PyTorch model at batch
1, 3 and 32 (ExecuTorch: its fixed batch of 1), and its batch axis must be symbolic
whatever the example's batch size.

Each file is written under a temporary name in its folder and renamed into place only
after its check passes: a failed export or check leaves an earlier file of that name as
it was.

The extra ``cdnv2[export]`` brings onnx, onnxscript, onnxruntime, openvino and nncf;
``cdnv2[mobile]`` brings executorch. AOTInductor needs only torch and a C++ compiler.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .graph import PREACT_FORMS, RUNTIMES, DeployError, build_deploy_model

log = logging.getLogger(__name__)

FORMATS = ("none", "torchscript", "onnx", "openvino", "aoti", "executorch", "all")
ALL_FORMATS = ["torchscript", "onnx", "openvino"]  # export=all: the quick ones (aoti compiles for minutes)
PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"), "executorch": ("executorch",)}
ONNX_PACKAGES = PACKAGES["onnx"]
INSTALL_HINT = "pip install 'cdnv2[export]'"
EXTRA_HINTS = {"executorch": "pip install 'cdnv2[mobile]'"}
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "openvino": ".xml", "aoti": ".pt2", "executorch": ".pte"}
CHECK_BATCHES = (1, 3, 32)


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
    metadata: dict[str, str] = field(default_factory=dict)  # what the file records about its graph

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def formats_for(choice: str) -> list[str]:
    if choice not in FORMATS:
        raise ExportError(f"export={choice!r}: use one of {', '.join(FORMATS)}")
    if choice == "none":
        return []
    return list(ALL_FORMATS) if choice == "all" else [choice]


def missing_packages(formats=("onnx",)) -> list[str]:
    names = dict.fromkeys(p for f in formats for p in PACKAGES.get(f, ()))
    return [name for name in names if importlib.util.find_spec(name) is None]


def require(formats=("onnx",)) -> None:
    """Raise before any work when an export format's packages are not installed."""
    missing = missing_packages(formats)
    if missing:
        hints = dict.fromkeys(EXTRA_HINTS.get(f, INSTALL_HINT) for f in formats if f in PACKAGES
                              and any(p in missing for p in PACKAGES[f]))
        raise ExportError(
            f"export to {', '.join(f for f in formats if f in PACKAGES)} needs {', '.join(missing)} "
            f"(not installed): {' and '.join(hints)}"
        )


def require_onnx() -> None:
    require(("onnx",))


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


def check_inputs(input_size: tuple[int, int, int], batch_sizes=CHECK_BATCHES, seed: int = 0) -> list[torch.Tensor]:
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


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    """Exporters specialise a size-1 dimension to a constant 1: trace on two images."""
    return example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()


# ----------------------------------------------------------------------------- TorchScript
def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Trace ``model`` on ``example`` and save it; the batch axis stays dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the file is checked after
        traced = torch.jit.trace(_exportable_copy(model), _batch_of_two(example), check_trace=False)
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
def deploy_form(model: nn.Module, runtime: str, input_size: tuple[int, int, int], preact: str | None = None,
                forms=None):
    """(module to export, metadata): the deployment form, or the model itself if it has none."""
    try:
        deploy = build_deploy_model(model, runtime, forms, input_size=input_size, preact=preact)
    except DeployError as e:
        log.info("exporting %s as it is (no deployment form: %s)", type(model).__name__, e)
        return None, {"cdnv2.deploy.runtime": "none", "cdnv2.deploy.summary": f"traced as it is: {e}"}
    return deploy, deploy.metadata()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, runtime: str = "onnxruntime",
                opset: int | None = None, preact: str | None = None, forms=None) -> Path:
    """Write the deployment form for ``runtime`` (inputs ``images``, outputs ``logits``).

    The batch axis is dynamic whatever ``example``'s batch size; the chosen layer forms
    are in the file's metadata (``cdnv2.deploy.*``). ``preact`` overrides the runtime's
    pre-activation BN form (:data:`cdnv2.deploy.graph.PREACT_FORMS`), ``forms`` the
    measured per-layer forms (one ``<lgc>/<3x3>`` for all layers, or a list).
    """
    require_onnx()
    # Mistakes, not reasons to fall back to tracing the model as it is:
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime={runtime!r}: use one of {', '.join(RUNTIMES)}")
    if preact is not None and preact not in PREACT_FORMS:
        raise ExportError(f"preact={preact!r}: use one of {', '.join(PREACT_FORMS)} (or None: the runtime's own)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _batch_of_two(example)
    deploy, meta = deploy_form(model, runtime, tuple(example.shape[1:]), preact, forms)
    if deploy is None:
        _export_dynamo(model, example, path, opset)
    else:
        _export_traced(deploy, example, path, opset)
    _finish_onnx(path, meta)
    return path


def _export_traced(deploy: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice; the file is checked after
        try:
            torch.onnx.export(deploy, (example,), str(path), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset or 17, do_constant_folding=True)
        except Exception as e:
            raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError(f"exporting a model without a deployment form needs onnxscript (not installed): {INSTALL_HINT}")
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {"opset_version": opset} if opset else {}
    clone = _exportable_copy(model)
    # The exporter reports progress on stdout; keep the command's output to our table.
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


def _finish_onnx(path: Path, meta: dict[str, str]) -> None:
    """Record the metadata; refuse a graph whose batch axis came out fixed."""
    import onnx

    m = onnx.load(str(path))
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise ExportError(f"ONNX export of {path} fixed the batch axis to {dim.dim_value}; "
                          "this is a bug in the exporter path, please report it")
    _inline_shared_initializers(m.graph)
    for key, value in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(m, str(path))


def _inline_shared_initializers(graph) -> None:
    """Give each ``Identity(initializer)`` its own copy of the tensor and drop the node.

    The exporter stores equal weights once (say the zero biases of several convs) and feeds
    the others through Identity nodes; a conv whose bias is not an initializer keeps an fp32
    bias in onnxruntime's int8 graph and cannot be fused with it.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]),
                                                             node.output[0]))
        else:
            keep.append(node)
    if len(keep) < len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


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


def onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


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
    from .sessions import ort_session

    path = Path(path)
    run = ort_session(path)
    check = _compare("onnx", path, model, inputs, lambda x: run(x.numpy()))
    check.op_types = onnx_op_types(path)
    check.metadata = onnx_metadata(path)
    odd = nonstandard_ops(check.op_types)
    if odd:
        check.ok = False
        log.warning("ONNX graph %s has non-standard operators: %s", path, ", ".join(odd))
    return check


# ----------------------------------------------------------------------------- OpenVINO
def export_openvino(model: nn.Module, example: torch.Tensor, path: str | Path, *,
                    class_names: list[str] | None = None, preprocess: dict | None = None) -> Path:
    """Write the OpenVINO IR ``path`` (.xml + .bin, fp32) of the deployment form for OpenVINO,
    and ``<stem>.xml.json`` beside it with the class names, eval preprocessing and metadata."""
    require(("openvino",))
    import openvino as ov

    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, example, Path(tmp) / "model.onnx", runtime="openvino")
        meta = onnx_metadata(onnx_path)
        ir = ov.convert_model(str(onnx_path))
    for key, value in meta.items():
        ir.set_rt_info(value, ["cdnv2", key.removeprefix("cdnv2.")])
    ov.save_model(ir, str(path), compress_to_fp16=False)  # fp16 weights would break the 1e-4 check
    write_sidecar(path, class_names, preprocess, meta)
    return path


def sidecar(path: str | Path) -> Path:
    """``model.onnx.json`` / ``model.xml.json``: what a deployment needs besides the graph."""
    return Path(path).with_name(Path(path).name + ".json")


def write_sidecar(path: Path, class_names, preprocess, meta: dict, source: dict | None = None) -> Path:
    """``source``: where the graph came from (model name and kwargs, data config, seed), so
    ``cdnv2-eval`` can evaluate the file on the run's data."""
    side = sidecar(path)
    side.write_text(json.dumps({"class_names": class_names, "preprocess": preprocess, "metadata": meta,
                                **({"source": source} if source else {})}, indent=1))
    return side


def openvino_metadata(path: str | Path) -> dict[str, str]:
    side = sidecar(path)
    return json.loads(side.read_text()).get("metadata", {}) if side.exists() else {}


def check_openvino(path: str | Path, model: nn.Module, inputs: list[torch.Tensor]) -> ExportCheck:
    from .sessions import openvino_session

    path = Path(path)
    run = openvino_session(path)
    check = _compare("openvino", path, model, inputs, lambda x: run(x.numpy()))
    check.file_bytes += path.with_suffix(".bin").stat().st_size
    check.metadata = openvino_metadata(path)
    return check


# ----------------------------------------------------------------------------- AOTInductor, ExecuTorch
def check_aoti(path: str | Path, model: nn.Module, inputs: list[torch.Tensor]) -> ExportCheck:
    from .aoti import aoti_metadata, load_aoti

    path = Path(path)
    run = load_aoti(path)
    with torch.no_grad():
        check = _compare("aoti", path, model, inputs, run)
    check.metadata = {k: v for k, v in aoti_metadata(path).items() if k.startswith("cdnv2.deploy.")}
    return check


def check_executorch(path: str | Path, model: nn.Module, inputs: list[torch.Tensor], batch: int = 1) -> ExportCheck:
    """The ``.pte`` in ExecuTorch's runtime on the inputs of its fixed batch size."""
    from .executorch import executorch_session

    path = Path(path)
    return _compare("executorch", path, model, [x for x in inputs if x.shape[0] == batch], executorch_session(path))


# ----------------------------------------------------------------------------- all
def export_and_check(
    model: nn.Module, formats: list[str], stem: str | Path, input_size: tuple[int, int, int], *,
    class_names: list[str] | None = None, preprocess: dict | None = None, source: dict | None = None,
) -> list[ExportCheck]:
    """Write ``<stem>.torchscript.pt`` / ``.onnx`` / ``.xml`` / ``.pt2`` / ``.pte``, each checked
    against ``model`` before it replaces a file of that name. ``source`` goes into the
    ``.pt2`` file's sidecar (see :func:`write_sidecar`)."""
    require([f for f in formats if f in PACKAGES])  # fail before spending time on any file
    unknown = [f for f in formats if f not in SUFFIXES]
    if unknown:
        raise ExportError(f"unknown export format {unknown[0]!r}: use one of {', '.join(SUFFIXES)}")
    stem = Path(stem)
    inputs = check_inputs(input_size)
    return [export_one(fmt, model, stem.with_name(stem.name + SUFFIXES[fmt]), input_size, inputs,
                       class_names=class_names, preprocess=preprocess, source=source) for fmt in formats]


def export_one(fmt: str, model: nn.Module, path: Path, input_size: tuple[int, int, int], inputs: list[torch.Tensor],
               *, class_names=None, preprocess=None, source: dict | None = None) -> ExportCheck:
    """Export ``fmt`` under a temporary name beside ``path``, check it, then rename it into place.

    A failed check leaves ``path`` (and its companions) as they were and returns the
    check with ``ok=False``; an exception leaves no temporary file behind.
    """
    temp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        check = _write_and_check(fmt, model, temp, input_size, inputs, class_names, preprocess, source)
        check.path = str(path)
        if check.ok:
            for src, dst in zip(_files(fmt, temp), _files(fmt, path)):
                if src.exists():
                    os.replace(src, dst)
        return check
    finally:
        for f in _files(fmt, temp):
            f.unlink(missing_ok=True)


def _files(fmt: str, path: Path) -> list[Path]:
    """A format's files, companions first and the main file last (renamed last)."""
    companions = [path.with_suffix(".bin")] if fmt == "openvino" else []
    return companions + [sidecar(path), path]


def _write_and_check(fmt, model, path, input_size, inputs, class_names, preprocess, source) -> ExportCheck:
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    if fmt == "torchscript":
        return check_torchscript(export_torchscript(model, example, path), model, inputs)
    if fmt == "onnx":
        export_onnx(model, example, path)
        write_sidecar(path, class_names, preprocess, onnx_metadata(path))
        return check_onnx(path, model, inputs)
    if fmt == "openvino":
        export_openvino(model, example, path, class_names=class_names, preprocess=preprocess)
        return check_openvino(path, model, inputs)
    if fmt == "aoti":
        from .aoti import export_aoti

        export_aoti(model, example, path, class_names=class_names, preprocess=preprocess)
        check = check_aoti(path, model, inputs)
        write_sidecar(path, class_names, preprocess, check.metadata, source)
        return check
    from .executorch import export_executorch

    _, meta = export_executorch(model, example[:1], path)
    write_sidecar(path, class_names, preprocess, meta)
    check = check_executorch(path, model, inputs)
    check.metadata = meta
    return check
