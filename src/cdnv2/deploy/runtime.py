"""Run an exported file in ONNX Runtime or OpenVINO on the CPU: one callable per file.

Both take ``threads`` (None: the runtime's default), so benchmarks can pin a thread
count without touching process-wide state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def ort_session(path: str | Path, threads: int | None = None, profile: str | None = None) -> Callable:
    """``run(images) -> logits`` for an ONNX file in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    run.session = session
    return run


def openvino_session(path: str | Path, threads: int | None = None, perf_counts: bool = False) -> Callable:
    """``run(images) -> logits`` for an OpenVINO IR (.xml) or ONNX file on OpenVINO's CPU plugin."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if perf_counts:
        config["PERF_COUNT"] = True
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[0].copy()

    run.request = request
    return run


def openvino_op_profile(run) -> dict[str, float]:
    """ms per node type of the last inference of an ``openvino_session(..., perf_counts=True)``."""
    totals: dict[str, float] = {}
    for info in run.request.profiling_info:
        totals[info.node_type] = totals.get(info.node_type, 0.0) + info.real_time.total_seconds() * 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
