"""Which form each dense layer takes in the deployed graph: the rule, and the measurement.

:func:`measure_forms` times every form of every dense layer on its own, in the target
runtime, at the layer's real input shape, and returns the fastest per layer
(``build_deploy_model(model, runtime, forms=measure_forms(...))`` uses them).
:func:`choose_form` is the rule that reproduces those measurements on the project's
reference CPU without timing anything (the default: exports stay deterministic).
"""
from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .graph import CONV3_FORMS, LGC_FORMS, PREACT_FORM, DeployDenseLayer

ALL_FORMS = tuple(f"{lgc}/{c3}" for lgc in LGC_FORMS for c3 in CONV3_FORMS)


def choose_form(layer: nn.Module, pixels: int, runtime: str) -> str:
    """The form measured fastest for a layer of this shape in ``runtime`` (docs/deploy.md).

    LGC: the dense form does G times the grouped multiply-adds but saves two channel
    gathers (and, in OpenVINO, the layout reorders around them); it wins while the layer
    is narrow. 3x3: the runtimes' grouped kernels are slow at a few channels per group;
    the dense conv over zeros wins while the per-group width is small.
    """
    lgc, conv3 = layer.conv_1, layer.conv_2.conv
    dense_lgc = lgc.in_channels * lgc.out_channels <= _DENSE_LGC_MACS[runtime]
    per_group = conv3.in_channels // conv3.groups
    dense_3x3 = per_group <= _DENSE_3X3_WIDTH[runtime]
    return f"{'dense' if dense_lgc else 'grouped'}/{'dense' if dense_3x3 else 'grouped'}"


# Thresholds from measure_forms on cdnv2_b (2-core x86, AVX2, batch 8, one thread; the
# per-layer table is in docs/deploy.md). ONNX Runtime: gather + grouped kernels won at
# every layer. OpenVINO: the dense LGC won up to 144 x 96 (its gathers force layout
# reorders around the blocked convs), the dense 3x3 at 4 inputs per group.
_DENSE_LGC_MACS = {"onnxruntime": 0, "openvino": 14_000}
_DENSE_3X3_WIDTH = {"onnxruntime": 0, "openvino": 4}


def _session(path: Path, runtime: str, threads: int | None):
    from .sessions import openvino_session, ort_session

    return ort_session(path, threads, spin=False) if runtime == "onnxruntime" else openvino_session(path, threads)


def layer_session(layer: nn.Module, form: str, shape: tuple[int, ...], runtime: str, tmp: Path,
                  threads: int | None = None):
    """``run(x)`` of one dense layer in ``form``, exported for a fixed (B, C, H, W) input."""
    module = DeployDenseLayer(layer, form, PREACT_FORM[runtime]).eval()
    path = tmp / f"layer-{form.replace('/', '-')}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17)
    return _session(path, runtime, threads)


def measure_forms(layers: list[nn.Module], sizes: list[tuple[int, int]], runtime: str, *, batch: int = 8,
                  forms=ALL_FORMS, repeats: int = 5, threads: int | None = None, report=None) -> list[str]:
    """The fastest form of each layer in ``runtime``; ``report(i, {form: ms})`` sees every timing."""
    chosen = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (layer, (hgt, wid)) in enumerate(zip(layers, sizes)):
            shape = (batch, layer.conv_1.in_channels, hgt, wid)
            runs = {f: layer_session(layer, f, shape, runtime, Path(tmp), threads) for f in forms}
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            times: dict[str, list[float]] = {f: [] for f in forms}
            for _ in range(repeats):  # round-robin: load from other processes hits all forms alike
                for f, run in runs.items():
                    run(x)
                    t0 = time.perf_counter()
                    run(x)
                    times[f].append((time.perf_counter() - t0) * 1e3)
            med = {f: statistics.median(v) for f, v in times.items()}
            if report is not None:
                report(i, med)
            chosen.append(min(med, key=med.get))
    return chosen
