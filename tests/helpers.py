"""Shared test helpers: run the real console commands, or the same run in-process."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

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


def condensed_tiny(seed: int = 0) -> torch.nn.Module:
    """cdnv2_tiny fully condensed and converted, with BN statistics far from the identity (folds matter)."""
    import cdnv2
    from cdnv2.layers import CondensingConv1x1

    torch.manual_seed(seed)
    model = cdnv2.create_model("cdnv2_tiny")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.normal_(0, 1)  # negative scales too
            m.bias.data.normal_(0, 0.5)
        if isinstance(m, CondensingConv1x1):
            while not m.fully_condensed:
                m.condense_step()
    return cdnv2.convert_model(model.eval(), check=False)
