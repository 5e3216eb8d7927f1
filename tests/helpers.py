"""Shared test helpers: run the real console commands, small configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

BIN = Path(sys.executable).parent

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
    full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max().item()
            raise AssertionError(f"{k} differs (max abs diff {diff:.3g})")
