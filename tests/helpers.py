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


# The shapes the tiny ImageFolder of make_image_folder draws, as its class folders
# (the first four of cdnv2.data.shapes.SHAPES_CLASSES).
FOLDER_CLASSES = ("circle", "square", "triangle", "ring")


def make_image_folder(root, per_class: int = (24, 8), seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` of generated shapes
    (``per_class``: train and val images per class of :data:`FOLDER_CLASSES`)."""
    from PIL import Image

    from cdnv2.data.shapes import make_shapes

    root = Path(root)
    for split, count, split_seed in (("train", per_class[0], seed), ("val", per_class[1], seed + 1)):
        images, labels = make_shapes(count * 12, seed=split_seed)
        written = {c: 0 for c in range(len(FOLDER_CLASSES))}
        for image, label in zip(images, labels.tolist()):
            if label < len(FOLDER_CLASSES) and written[label] < count:
                folder = root / split / FOLDER_CLASSES[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{written[label]:03d}.png")
                written[label] += 1
    return root


# cdnv2-train on make_image_folder's tree: 32x32 images as they are, a few steps.
FOLDER_QUICK = [
    "data=imagefolder", "data.image_size=32", "data.eval_resize=null", "data.random_resized_crop=false",
    "data.num_workers=0", "data.batch_size=16", "data.eval_batch_size=64",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.3,0.3,0.3]",
    "trainer.epochs=4", "trainer.max_steps_per_epoch=6", "trainer.parity_samples=8",
    "trainer.progress=none", "trainer.threads=1",
]
