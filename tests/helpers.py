"""Shared test helpers: run the real console commands, or the same run in-process; small
configs and models; official release layouts built from our models."""
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
from torch import nn

import cdnv2
from cdnv2.condense import condense_fully
from cdnv2.data import DataConfig
from cdnv2.engine import TrainConfig, TrainerConfig
from cdnv2.layers import CondensingConv1x1

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


# The shapes data of the session's tiny_run (tests/conftest.py).
TINY_DATA = dict(num_train=384, num_val=128, batch_size=32)


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


# ----------------------------------------------------------------------------- configs and models
def quick_config(**trainer) -> TrainConfig:
    cfg = TrainConfig(data=DataConfig(num_train=384, num_val=128, batch_size=32))
    cfg.trainer = TrainerConfig(epochs=3, max_steps_per_epoch=4, parity_samples=8, progress="none", **trainer)
    return cfg


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine params (mixed signs, some exact zeros) and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                w = torch.randn(n, generator=g) * 0.6 + 0.8
                w[torch.rand(n, generator=g) < 0.05] = 0.0
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def make(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return condense_fully(randomize(cdnv2.create_model(name, **kwargs), seed)).eval()


def example(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = 32 if model.cfg.stem_stride == 1 else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- official layouts
# The official layouts are rebuilt from our masked models with loops that follow the
# official conversion's definitions (not with our compact-layer code), so a mismatch in
# index order or weight layout shows up as different outputs.
def masked_model(name, seed=0, steps=None):
    torch.manual_seed(seed)
    model = randomize(cdnv2.create_model(name), seed)
    if steps is None:
        condense_fully(model)
    else:
        for m in model.modules():
            if isinstance(m, CondensingConv1x1):
                for _ in range(steps):
                    m.condense_step()
    return model.eval()


def unconverted_layout(model, prefix=""):
    """Our masked state dict spelled the official way (_mask, float _stage/_count, features.se_last)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CondensingConv1x1)}
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if key.startswith("se_last."):
            key = "features." + key
        if owner in layers and leaf == "mask":
            out[prefix + owner + "._mask"] = value.clone()
            continue
        if owner in layers and leaf == "stage":
            m = layers[owner]
            delta = (m.out_channels if m.group_axis == 1 else m.in_channels) // m.condense_factor
            out[prefix + owner + "._stage"] = torch.tensor([float(value)])
            out[prefix + owner + "._count"] = torch.tensor([float(value) * delta])
            continue
        out[prefix + key] = value.clone()
    return out


def _converted_lgc(m):
    """The official CondensingLGC conversion, written out with loops."""
    mask = m.mask[:, :, 0, 0]
    w = m.conv.weight[:, :, 0, 0]
    o, i_ch, g = m.out_channels, m.in_channels, m.groups
    per_group_in, d_out = i_ch // m.condense_factor, o // g
    index, weight = [], torch.zeros(o, per_group_in)
    for grp in range(g):
        chosen = [j for j in range(i_ch) if mask[grp, j] == 1][:per_group_in]
        for t, j in enumerate(chosen):
            for k in range(d_out):
                weight[k + grp * d_out, t] = w[grp + k * g, j]
        index += chosen
    index = torch.tensor(index, dtype=torch.long)
    norm = {f"norm.{n}": getattr(m.norm, n)[index].clone() for n in ("weight", "bias", "running_mean", "running_var")}
    norm["norm.num_batches_tracked"] = m.norm.num_batches_tracked.clone()
    return {"index": index, "conv.weight": weight[:, :, None, None], **norm}


def _converted_sfr(m):
    """The official CondensingSFR conversion (routing matrix included), with loops."""
    mask = m.mask[:, :, 0, 0]
    w = m.conv.weight[:, :, 0, 0]
    c, k, g = m.out_channels, m.in_channels, m.groups
    per_group_out = c // m.condense_factor
    produced = per_group_out * g
    weight, routing = torch.zeros(produced, k // g), torch.zeros(produced, c)
    filled = [0] * g
    for target in range(c):
        for grp in range(g):
            if filled[grp] < per_group_out and mask[target, grp] == 1:
                r = filled[grp] + grp * per_group_out
                for kk in range(k // g):
                    weight[r, kk] = w[target, grp + kk * g]
                routing[r, target] = 1.0
                filled[grp] += 1
    norm = {f"norm.{n}": getattr(m.norm, n).clone() for n in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    return {"index": routing, "conv.weight": weight[:, :, None, None], **norm}


def converted_layout(model, prefix=""):
    out = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CondensingConv1x1)}
    for key, value in unconverted_layout(model).items():
        owner = key.rsplit(".", 1)[0]
        if owner.rsplit(".", 1)[0] in layers or owner in layers:
            continue  # replaced below
        out[prefix + key] = value
    for name, m in layers.items():
        conv = _converted_sfr(m) if name.endswith("sfr") else _converted_lgc(m)
        for leaf, value in conv.items():
            out[f"{prefix}{name}.{leaf}"] = value
    return out


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
