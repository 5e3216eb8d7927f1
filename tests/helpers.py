"""Shared test helpers: run the real console commands, or the same run in-process."""
from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent

# A few-second run of the whole path on small generated shapes data.
QUICK = [
    "data.num_train=384",
    "data.num_val=128",
    "data.batch_size=32",
    "trainer.epochs=3",
    "trainer.max_steps_per_epoch=4",
    "trainer.parity_samples=8",
    "trainer.progress=lines",
    "trainer.threads=1",
]


def cli(name: str, *args: str, env: dict | None = None, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which(name, path=str(BIN)) or str(BIN / name)
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env=command_env(env), timeout=timeout, cwd=cwd
    )


def command_env(extra: dict | None = None) -> dict:
    """The environment of a real command: tests/ on PYTHONPATH, so that the ``callbacks``
    key can name fault_injection.* callbacks."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": path, **(extra or {})}


def callback(name: str, target: str, **kwargs) -> str:
    """The override that adds callback ``name`` (``target``: a class in fault_injection)."""
    args = "".join(f",{k}:{v!r}" if isinstance(v, str) else f",{k}:{v}" for k, v in kwargs.items())
    return f"+callbacks.{name}={{_target_:fault_injection.{target}{args}}}"


@contextmanager
def restored_process_state():
    """Undo configure_runtime's process-wide changes when the block ends."""
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    rng, py_rng = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_rng_state(rng)
        random.setstate(py_rng)


def run_like_cli(run_dir, *overrides: str, callbacks=()) -> dict:
    """``cdnv2-train <overrides>`` in this process: same composition, runtime set-up and
    training, so it ends with the same weights as the real command."""
    from cdnv2.cli.train import compose_train_config, run_command

    cfg = compose_train_config(list(overrides))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with restored_process_state():
        return run_command(cfg, str(run_dir), callbacks)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max().item()
            raise AssertionError(f"{k} differs (max abs diff {diff:.3g})")


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the CIFAR python batches: protocol 2, byte
    strings as (SHORT_)BINSTRING and numpy under its old name ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        head = pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256 else (
            pickle.BINSTRING + struct.pack("<i", len(data)))
        self.write(head + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_like_python2(obj, path) -> None:
    """Write ``obj`` to ``path`` the way the original CIFAR batches were written."""
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def write_cifar10(root, n: int = 12, dump=dump_like_python2, evil=None) -> Path:
    """A tiny ``cifar-10-batches-py`` under ``root`` with the originals' keys; ``evil``
    (an object) is stored beside the images of every batch."""
    rng = np.random.default_rng(0)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for part in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": f"{part} of 6".encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if evil is not None:
            batch[b"extra"] = evil
        dump(batch, folder / part)
    dump({b"label_names": [f"c10_{i}".encode() for i in range(10)], b"num_cases_per_batch": n, b"num_vis": 3072},
         folder / "batches.meta")
    return Path(root)


class TouchOnUnpickle:
    """Unpickling this creates ``marker``: what a malicious data file would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
