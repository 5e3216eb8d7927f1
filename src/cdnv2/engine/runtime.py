"""Process-wide settings of a command: device choice, threads, seeds, deterministic kernels.

:func:`resolve_device` and :func:`resolve_compact_training` turn device-dependent config
values into what this process runs with.

Only the console commands call :func:`configure_runtime`, once, before any work. The
library (``Trainer``, ``evaluate``, conversion) leaves process-wide state alone, so a
notebook or a test that calls it keeps its own threads, seeds and kernel flags.

``deterministic`` takes three values:

- ``auto`` (default): exact where it is cheap, fast where exactness costs. On CPU,
  deterministic algorithms (a resumed run ends with exactly the weights of an
  uninterrupted one; the tests prove it). On CUDA, cuDNN autotuning
  (``cudnn.benchmark``) and TF32 matmuls/convolutions: the fast kernels, which vary
  from run to run in the last bits.
- ``true``: deterministic on every device. On CUDA this also sets
  ``CUBLAS_WORKSPACE_CONFIG`` (it must be set before cuBLAS starts), turns cuDNN
  autotuning off, and makes an op without a deterministic CUDA kernel raise instead of
  warn; slower (see the log line it prints).
- ``false``: the fast settings on every device.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Optional

import torch

from ..errors import ConfigError
from .config import AMP_MODES

log = logging.getLogger("cdnv2")

MODES = ("auto", "true", "false")
CUBLAS_WORKSPACE = ":4096:8"  # PyTorch's reproducibility notes: needed for deterministic cuBLAS
# trainer.amp / cdnv2-eval amp=: the autocast dtype of each mode (None: full precision)
AUTOCAST_DTYPES = dict(zip(AMP_MODES, (None, torch.bfloat16, torch.float16)))


def resolve_device(name: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; ``cuda`` means this rank's GPU.

    ``key`` is the config key the name came from, for the error message.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name!r} but CUDA is not available; use {key}=cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise ConfigError(f"{key}={name!r}: use auto, cpu, cuda or cuda:N")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r}: use auto, cpu, cuda or cuda:N") from None


def resolve_compact_training(value, device: torch.device) -> bool:
    """``trainer.compact_training``: true, false or auto (the form that measured faster).

    auto: compact training on CPU, where it measured 1.1-1.5x the masked step
    (docs/convert.md); the masked form on other devices until ``scripts/gpu_check.py``
    has measured the compact form faster there (docs/gpu.md).
    """
    v = str(value).lower()
    if v == "auto":
        return device.type == "cpu"
    if v in ("true", "false"):
        return v == "true"
    raise ConfigError(f"trainer.compact_training={value!r}: use auto, true or false")


def deterministic_mode(value: Any, key: str = "deterministic") -> str:
    """Normalise ``auto``/``true``/``false`` (YAML booleans and old checkpoints' bools too)."""
    text = str(value).strip().lower()
    if text not in MODES:
        raise ConfigError(f"{key}={value!r}: use auto (exact on CPU, fast on CUDA), true or false")
    return text


def configure_runtime(
    device: str | torch.device = "auto",
    *,
    deterministic: Any = "auto",
    threads: Optional[int] = None,
    seed: Optional[int] = None,
    key: str = "",
) -> str:
    """Set the process-wide state a command runs under; return (and log) what was set.

    ``key`` prefixes the config keys in messages (``trainer.`` for cdnv2-train).
    """
    mode = deterministic_mode(deterministic, f"{key}deterministic")
    device_type = resolve_device(str(device), key=f"{key}device").type
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"{key}threads={threads} must be >= 1 (or null: torch's default)")
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)  # every device's generator
        random.seed(seed)
    exact = mode == "true" or (mode == "auto" and device_type == "cpu")
    if device_type == "cuda" and exact:
        _exact_cuda()
    elif device_type == "cuda":
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convs use TF32 by default
    else:
        # Few CPU ops lack a deterministic kernel; a warning (not an error) keeps the run going.
        torch.use_deterministic_algorithms(exact, warn_only=True)
    note = _describe(mode, device_type, exact)
    (log.warning if device_type == "cuda" and exact else log.info)("%s", note)
    return note


def _exact_cuda() -> None:
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
        if torch.cuda.is_initialized():
            log.warning("CUDA started before deterministic mode; set CUBLAS_WORKSPACE_CONFIG=%s in "
                        "the environment for deterministic cuBLAS", CUBLAS_WORKSPACE)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _describe(mode: str, device_type: str, exact: bool) -> str:
    if device_type == "cpu":
        return (f"deterministic={mode} on CPU: deterministic algorithms (exact resume)" if exact
                else f"deterministic={mode} on CPU: torch's default kernels")
    if exact:
        return (f"deterministic={mode} on CUDA: deterministic kernels only, cuDNN autotuning off, "
                f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}. This costs "
                "speed (cuDNN's fastest algorithms and atomics-based kernels are not used) and an op "
                "without a deterministic CUDA kernel raises; use deterministic=auto for speed")
    return f"deterministic={mode} on CUDA: cuDNN autotuning and TF32 on (fast, not bitwise reproducible)"
