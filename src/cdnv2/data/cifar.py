"""CIFAR-10/100 read from torchvision's on-disk layout, and in-memory image datasets.

The pickles are read directly rather than through ``torchvision.datasets.CIFAR10``, which
answers any missing or altered file with "Dataset not found or corrupted" and checks
MD5s; here a missing dataset says where it looked and how to get it. Downloading still
goes through torchvision (``data.download=true``).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .config import DataError

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


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise DataError(
            f"Cannot read {path} ({type(e).__name__}: {e}). The file is truncated or not a CIFAR "
            "batch: delete the folder and extract the archive again, or set data.download=true."
        ) from None


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
    classes = list(_read_pickle(folder / spec["meta"])[spec["names"]])

    def read(parts: list[str], split: str) -> InMemoryImages:
        images, labels = [], []
        for part in parts:
            batch = _read_pickle(folder / part)
            try:
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += list(batch[spec["labels"]])
            except (KeyError, ValueError) as e:
                raise DataError(f"{folder / part} is not a {spec['title']} batch ({type(e).__name__}: {e}).") from None
        data = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # NHWC for PIL
        return InMemoryImages(data, labels, f"{name}/{split}")

    return read(spec["train"], "train"), read(spec["test"], "test"), classes
