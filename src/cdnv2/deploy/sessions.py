"""Run an exported file in ONNX Runtime or OpenVINO on the CPU: one callable per file.

Both take ``threads`` (None: the runtime's default), so benchmarks can pin a thread
count without touching process-wide state. OpenVINO runs in float32 unless asked otherwise
(its CPU default is bfloat16 where the CPU has it). ``spin=False`` stops ONNX Runtime's idle
threads from busy-waiting after each run: without it they hold the CPU for a while and
slow whatever runs next in the process (another model timed round-robin, say).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np


def ort_session(path: str | Path, threads: int | None = None, profile: str | None = None,
                spin: bool = True) -> Callable:
    """``run(images) -> logits`` for an ONNX file in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one ``openvino.Core``: every OpenVINO call here goes through it.

    Why one: each Core's CPU plugin installs an alternate signal stack for the thread that
    compiles and, when freed, puts back the stack it found. Two Cores freed in the order they
    were made (A, B; A freed, then B) leave the thread's alternate stack pointing at A's
    freed memory, and the next Python signal handler run on that thread (CPython installs
    them with SA_ONSTACK; a DataLoader's SIGCHLD handler when its workers exit) kills the
    process with SIGSEGV. A Core that lives as long as the process never frees its stack.
    docs/deploy.md has the reproduction (OpenVINO 2026.4).
    """
    import openvino as ov

    return ov.Core()


def openvino_session(path: str | Path, threads: int | None = None, perf_counts: bool = False,
                     precision: str | None = "f32") -> Callable:
    """``run(images) -> logits`` for an OpenVINO IR (.xml) or ONNX file on OpenVINO's CPU plugin.

    ``precision`` is the plugin's inference precision. f32 by default: on CPUs with
    AVX512-BF16 or AMX (Zen 4, Sapphire Rapids) OpenVINO otherwise computes in bfloat16,
    a few 1e-3 of the output scale off PyTorch, so a check against PyTorch would fail there and timings would
    not be fp32. ``"bf16"`` (or None: the plugin's default) is the faster deployment choice
    on such CPUs.
    """
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if perf_counts:
        config["PERF_COUNT"] = True
    compiled = openvino_core().compile_model(str(path), "CPU", config)
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
