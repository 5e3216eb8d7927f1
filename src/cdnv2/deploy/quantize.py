"""int8: static quantization of an exported model, calibrated on the run's own images.

OpenVINO files go through NNCF's post-training quantization, ONNX files through
``onnxruntime.quantization`` (QDQ, int8 weights per channel, uint8 activations). Both
calibrate on a few hundred *training* images of the artifact's data config, read with
the eval preprocessing; :func:`compare_int8` then reports fp32 vs int8 top-1 on the
validation split and the speed-up at one batch size in the same runtime.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

QUANTIZE = ("none", "int8")


@dataclass
class Int8Result:
    format: str
    path: str
    fp32_top1: float
    int8_top1: float
    val_images: int
    fp32_ms: float
    int8_ms: float
    batch: int
    pytorch_top1: float | None = None  # the PyTorch compact model on the same images
    agreement: float | None = None  # % of val images where int8 and fp32 predict the same class

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    def as_dict(self) -> dict:
        return {**self.__dict__, "speedup": self.speedup}


# ----------------------------------------------------------------------------- data
def calibration_images(data, count: int, batch: int = 32) -> list[np.ndarray]:
    """``count`` training images (evenly spaced over the split) with the eval preprocessing."""
    from ..data import build_eval_transform

    source = data.train_loader.dataset.source
    transform = build_eval_transform(data.eval_preprocess)
    picks = np.linspace(0, len(source) - 1, num=min(count, len(source))).round().astype(int)
    images = []
    for i in picks:
        try:
            img, _ = source.load(int(i))
        except Exception as e:  # an unreadable image only shrinks the calibration set
            log.warning("calibration skips %s: %s", source.describe(int(i)), e)
            continue
        images.append(transform(img).numpy())
    return [np.stack(images[s:s + batch]).astype(np.float32) for s in range(0, len(images), batch)]


def val_batches(data) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(images.numpy().astype(np.float32), targets.numpy()) for images, targets in data.val_loader]


def predictions(run, batches) -> np.ndarray:
    return np.concatenate([np.asarray(run(x)).argmax(1) for x, _ in batches])


def top1(run, batches) -> float:
    return _percent(predictions(run, batches) == _targets(batches))


def _targets(batches) -> np.ndarray:
    return np.concatenate([np.asarray(y) for _, y in batches])


def _percent(hits: np.ndarray) -> float:
    return 100.0 * float(hits.sum()) / max(len(hits), 1)


# ----------------------------------------------------------------------------- quantizers
def quantize_openvino_file(src: str | Path, dst: str | Path, calib: list[np.ndarray]) -> Path:
    """NNCF static int8 of an OpenVINO IR or ONNX file -> IR ``dst`` (.xml).

    ``src`` must hold its pre-activation BNs as BatchNormalization (``export_onnx(...,
    runtime="openvino", preact="bn")``), not as the fp32 OpenVINO graph's depthwise convs.
    """
    import nncf
    import openvino as ov

    from .graph import DeployError
    from .sessions import openvino_core

    model = openvino_core().read_model(str(src))
    if _per_channel_affines(model):
        raise DeployError(
            f"{src} holds its pre-activation BNs as depthwise 1x1 convolutions (the fp32 OpenVINO form); "
            "OpenVINO 2026.4 crashes compiling them quantized and loses accuracy with them left fp32 "
            "on AVX512 CPUs: quantize the BatchNormalization form, export_onnx(model, example, path, "
            "runtime='openvino', preact='bn')")
    nncf_log = logging.getLogger("nncf")  # one INFO paragraph per layer otherwise
    level = nncf_log.level
    nncf_log.setLevel(max(level, logging.WARNING))
    try:
        quantized = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib),  # items are batches
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
    finally:
        nncf_log.setLevel(level)
    if Path(src).suffix == ".onnx":
        from .export import onnx_metadata

        for key, value in onnx_metadata(src).items():
            quantized.set_rt_info(value, ["cdnv2", key.removeprefix("cdnv2.")])
    dst = Path(dst).with_suffix(".xml")
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst


def openvino_int8_source(model, input_size: tuple[int, int, int], path: str | Path) -> Path:
    """The ONNX file NNCF quantizes for OpenVINO: the OpenVINO deployment form with
    BatchNormalization pre-activations (see :func:`quantize_openvino_file`)."""
    import torch

    from .export import export_onnx

    return export_onnx(model, torch.zeros(1, *input_size), path, runtime="openvino", preact="bn")


def _per_channel_affines(model) -> list[str]:
    """Names of the depthwise 1x1 convolutions (the fp32 OpenVINO graph's pre-activation BNs)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() == "GroupConvolution":
            shape = op.input(1).get_partial_shape()  # (groups, out, in, kh, kw) per group
            if shape.is_static and list(shape.to_shape())[1:] == [1, 1, 1, 1]:
                names.append(op.get_friendly_name())
    return names


class _Reader:
    def __init__(self, name: str, calib: list[np.ndarray]):
        self.name, self.items = name, iter(calib)

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {self.name: x}


def quantize_onnx_file(src: str | Path, dst: str | Path, calib: list[np.ndarray]) -> Path:
    """onnxruntime static int8 (QDQ, per-channel int8 weights, uint8 activations)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    root = logging.getLogger()  # the quantizer's advice goes to the root logger: keep it off the table
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_static(str(src), str(dst), _Reader(name, calib), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        # the multiply-adds; a BatchNormalization stays fp32 between its Q/DQ pairs
                        op_types_to_quantize=["Conv", "Gemm"])
    finally:
        root.setLevel(level)
    return Path(dst)


def int8_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.replace(path.suffix, "") + ".int8" + path.suffix)


def quantize_file(fmt: str, path: str | Path, calib: list[np.ndarray], source: str | Path | None = None) -> Path:
    """The int8 copy of the exported ``path`` beside it, quantized from ``source`` (default:
    ``path`` itself; the OpenVINO copy needs the BatchNormalization form, see above)."""
    if fmt == "openvino":
        return quantize_openvino_file(source or path, int8_path(path), calib)
    if fmt == "onnx":
        return quantize_onnx_file(source or path, int8_path(path), calib)
    raise ValueError(f"no int8 path for format {fmt!r}")


def _session(fmt: str, path: Path):
    from .sessions import openvino_session, ort_session

    return openvino_session(path) if fmt == "openvino" else ort_session(path, spin=False)


def time_ms(runs: dict, x: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """Median ms per call of each callable, timed round-robin on ``x``."""
    times = {k: [] for k in runs}
    for run in runs.values():
        run(x)
    for _ in range(repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_int8(fmt: str, fp32_path: str | Path, calib: list[np.ndarray], val, *, batch: int = 32,
                 repeats: int = 5, source: str | Path | None = None) -> Int8Result:
    """Quantize ``fp32_path`` (from ``source``, see :func:`quantize_file`); top-1 of both on
    ``val`` batches and ms at ``batch`` in the same runtime."""
    fp32_path = Path(fp32_path)
    q_path = quantize_file(fmt, fp32_path, calib, source)
    runs = {"fp32": _session(fmt, fp32_path), "int8": _session(fmt, q_path)}
    pred = {k: predictions(run, val) for k, run in runs.items()}
    targets = _targets(val)
    shape = calib[0].shape[1:]
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    ms = time_ms(runs, x, repeats)
    return Int8Result(fmt, str(q_path), _percent(pred["fp32"] == targets), _percent(pred["int8"] == targets),
                      len(targets), ms["fp32"], ms["int8"], batch,
                      agreement=_percent(pred["fp32"] == pred["int8"]))
