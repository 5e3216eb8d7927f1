"""CIFAR-10/100 read from torchvision's on-disk layout, and in-memory image datasets.

The pickles are read directly rather than through ``torchvision.datasets.CIFAR10``, which
answers any missing or altered file with "Dataset not found or corrupted" and checks
MD5s; here a missing dataset says where it looked and how to get it. Downloading still
goes through torchvision (``data.download=true``).

The batches are parsed as plain data (:mod:`cdnv2.safe_pickle`), never with ``pickle.load``:
a folder whose pickles name anything but dicts, lists, strings, ints and numpy arrays
is refused before that code could run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from .config import DataError
from ..safe_pickle import ForbiddenGlobal, load_plain_data

_CIFAR = {
    "cifar10": dict(
        title="CIFAR-10", folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        meta="batches.meta", labels="labels", names="label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": dict(
        title="CIFAR-100", folder="cifar-100-python",
        train=["train"], test=["test"],
        meta="meta", labels="fine_labels", names="fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


class InMemoryImages(torch.utils.data.Dataset):
    """Images held in memory: uint8 NHWC numpy (given to transforms as PIL, like
    torchvision's CIFAR) or uint8 NCHW tensor (given as a tensor)."""

    def __init__(self, images, labels, name: str):
        self.images = images
        self.targets = np.asarray(labels, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int):
        img = self.images[index]
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return img, int(self.targets[index])


def _read_pickle(path: Path, title: str, url: str) -> dict:
    """One CIFAR file as a dict, parsed without running code (:mod:`cdnv2.safe_pickle`)."""
    try:
        with open(path, "rb") as f:
            obj = load_plain_data(f)
    except ForbiddenGlobal as e:
        raise DataError(
            f"{path} is not a {title} file: unpickling it would call {e.name}, and data files are "
            "parsed as plain data (dicts, lists, strings, numbers, numpy arrays), never run. Do not "
            f"use this folder; delete it and extract {url} again."
        ) from None
    except Exception as e:
        raise DataError(
            f"Cannot read {path} ({type(e).__name__}: {e}). The file is truncated or not a CIFAR "
            "batch: delete the folder and extract the archive again, or set data.download=true."
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a {title} file: it holds a {type(obj).__name__}, not a dict.")
    return {_text(k): v for k, v in obj.items()}


def _text(value: Any) -> Any:
    """Python 2 strings re-pickled by Python 3 as bytes (``encoding="bytes"``) read as str."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _field(obj: dict, key: str, path: Path, title: str) -> Any:
    if key not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise DataError(f"{path} is not a {title} file: it has no {key!r} entry (its keys: {keys}).")
    return obj[key]


def _download(name: str, root: Path) -> None:
    from torchvision import datasets  # only needed here

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:
        raise DataError(
            f"Downloading {_CIFAR[name]['title']} into {root} failed ({type(e).__name__}: {e}). "
            f"Without internet, fetch {_CIFAR[name]['url']} elsewhere and extract it into {root}."
        ) from None


def build_cifar_datasets(name: str, root: Optional[str], download: bool) -> tuple[InMemoryImages, InMemoryImages, list[str]]:
    """Train and test sets of ``cifar10``/``cifar100`` under ``root``, and the class names."""
    spec = _CIFAR[name]
    if not root:
        raise DataError(
            f"data.root is not set; data={name} reads {spec['title']} from <root>/{spec['folder']}/. "
            "Set data.root to that parent folder (with data.download=true to fetch it there)."
        )
    base = Path(root).expanduser().absolute()  # messages name the folder really searched
    folder = base / spec["folder"]
    files = [*spec["train"], *spec["test"], spec["meta"]]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download(name, base)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        which = "none of them is there" if len(missing) == len(files) else f"missing {', '.join(missing)}"
        raise DataError(
            f"{spec['title']} was not found: looked for {folder}/ with {', '.join(files)}; "
            f"{which}. Set data.download=true to fetch it (needs internet), or "
            f"download {spec['url']} and extract it into {base}."
        )
    title, url = spec["title"], spec["url"]
    meta = folder / spec["meta"]
    classes = _field(_read_pickle(meta, title, url), spec["names"], meta, title)
    classes = [_text(c) for c in classes] if isinstance(classes, list) else classes
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{meta} is not a {title} file: {spec['names']!r} is not a list of class names.")

    def read(parts: list[str], split: str) -> InMemoryImages:
        images, labels = [], []
        for part in parts:
            path = folder / part
            batch = _read_pickle(path, title, url)
            data, part_labels = _field(batch, "data", path, title), _field(batch, spec["labels"], path, title)
            try:
                images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(part_labels, dtype=np.int64).reshape(-1))
            except (TypeError, ValueError, OverflowError) as e:
                raise DataError(f"{path} is not a {title} batch ({type(e).__name__}: {e}).") from None
            if len(labels[-1]) != len(images[-1]):
                raise DataError(f"{path} is not a {title} batch: {len(images[-1])} images but "
                                f"{len(labels[-1])} labels.")
        data = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # NHWC for PIL
        return InMemoryImages(data, np.concatenate(labels), f"{name}/{split}")

    return read(spec["train"], "train"), read(spec["test"], "test"), classes
