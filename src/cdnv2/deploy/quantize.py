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


def top1(run, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((np.asarray(run(x)).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


# ----------------------------------------------------------------------------- quantizers
def quantize_openvino_file(src: str | Path, dst: str | Path, calib: list[np.ndarray]) -> Path:
    """NNCF static int8 of an OpenVINO IR or ONNX file -> IR ``dst`` (.xml)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    dataset = nncf.Dataset(calib)
    ignored = nncf.IgnoredScope(names=_per_channel_affines(model), validate=False)
    quantized = nncf.quantize(model, dataset, subset_size=len(calib),  # items are batches
                              preset=nncf.QuantizationPreset.PERFORMANCE, ignored_scope=ignored)
    dst = Path(dst).with_suffix(".xml")
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst


def _per_channel_affines(model) -> list[str]:
    """The depthwise 1x1 convolutions (pre-activation BNs in the OpenVINO graph): they stay
    fp32. They are per-channel affine maps with nothing to gain from int8, and OpenVINO
    2026.4's CPU plugin crashes (SIGSEGV) compiling them quantized on AVX512 CPUs."""
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
    quantize_static(str(src), str(dst), _Reader(name, calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                    # the multiply-adds; a BatchNormalization stays fp32 between its Q/DQ pairs
                    op_types_to_quantize=["Conv", "Gemm"])
    return Path(dst)


def int8_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.replace(path.suffix, "") + ".int8" + path.suffix)


def quantize_file(fmt: str, path: str | Path, calib: list[np.ndarray]) -> Path:
    if fmt == "openvino":
        return quantize_openvino_file(path, int8_path(path), calib)
    if fmt == "onnx":
        return quantize_onnx_file(path, int8_path(path), calib)
    raise ValueError(f"no int8 path for format {fmt!r}")


def _session(fmt: str, path: Path):
    from .runtime import openvino_session, ort_session

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
                 repeats: int = 5) -> Int8Result:
    """Quantize ``fp32_path``; top-1 of both on ``val`` batches and ms at ``batch`` in the same runtime."""
    fp32_path = Path(fp32_path)
    q_path = quantize_file(fmt, fp32_path, calib)
    runs = {"fp32": _session(fmt, fp32_path), "int8": _session(fmt, q_path)}
    acc = {k: top1(run, val) for k, run in runs.items()}
    shape = calib[0].shape[1:]
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    ms = time_ms(runs, x, repeats)
    return Int8Result(fmt, str(q_path), acc["fp32"], acc["int8"], sum(len(y) for _, y in val),
                      ms["fp32"], ms["int8"], batch)
