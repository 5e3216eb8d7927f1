"""Class-folder datasets (ImageNet, any ImageFolder tree): layout checks, split, decoding.

The layout is checked when the data is built (folders exist, at least two classes, every
class folder holds at least one image file) so that a wrong path fails in a second,
before training starts; images are decoded only when a sample is drawn.

Scanning follows links to folders (class folders are often links to other disks) but
never enters a folder twice: a link back up the tree or into another class is skipped
with a warning, so a loop neither hangs nor files one class's images under another.
Images with more than 8 bits per channel are scaled to 8 bits, not clipped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .config import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_LAYOUT = (
    "Expected {root}/train/<class>/<image> and {root}/val/<class>/<image>, or one folder of "
    "class folders with data.val_fraction > 0 to hold out part of it."
)


# What to do about an unreadable image in a training or evaluation dataset.
DATASET_FIX = ("replace or delete it, or set data.on_corrupt=skip to skip unreadable images (each one "
               "is counted and logged).")


def load_image(path: str, fix: str = DATASET_FIX) -> Image.Image:
    """Decode ``path`` to RGB, or raise a DataError naming the file and ending with ``fix``."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # the full decode, so truncation shows here
            return to_8bit(img).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(
            f"Cannot read the image {path} ({type(e).__name__}: {e}). The file is unreadable or "
            f"truncated: {fix}"
        ) from None


# Single-channel modes whose values PIL's convert("RGB") clips to 0..255 instead of scaling.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images as 8-bit "L", scaled rather than clipped.

    Integers are read as fractions of their full scale: "I;16" of 65535; "I" (PIL's mode
    for 16- and 32-bit data alike) of the smallest of 255, 65535 and 2**31 - 1 that holds
    the image's largest value (the signed 32-bit range if a value is negative). Floats in [0, 1]
    are fractions, floats in [0, 255] are 8-bit values; any other range is stretched
    from the image's own minimum to its maximum. Other modes are returned unchanged.
    """
    if img.mode not in _WIDE_MODES:
        return img
    values = np.asarray(img).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F":
        if lo >= 0 and hi <= 1:
            low, full = 0.0, 1.0
        elif lo >= 0 and hi <= 255:
            low, full = 0.0, 255.0
        else:
            low, full = lo, max(hi - lo, 1e-12)
    elif img.mode.startswith("I;16"):
        low, full = 0.0, 65535.0
    elif lo < 0:
        low, full = -(2.0**31), 2.0**32 - 1
    else:
        low, full = 0.0, next(f for f in (255.0, 65535.0, 2.0**31 - 1) if hi <= f)
    scaled = np.clip(np.rint((values - low) * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


class ImageFiles(torch.utils.data.Dataset):
    """A list of (image file, label) pairs; ``load(i)`` decodes one.

    Paths and labels live in numpy arrays rather than a list of tuples, so that forked
    loader workers do not copy a million Python objects by touching their refcounts.
    """

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths = np.array(paths, dtype=np.str_)
        self.targets = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def load(self, index: int) -> tuple[Image.Image, int]:
        return load_image(str(self.paths[index])), int(self.targets[index])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _identity(path: str | Path) -> tuple[int, int]:
    """The folder itself, whatever link led to it: (device, inode) of its target."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _list_images(top: Path, seen: set[tuple[int, int]], skipped: list[str]) -> list[str]:
    """Image files under ``top`` (sorted), entering each folder once: links to folders in
    ``seen`` (and hidden folders) are passed over, links are appended to ``skipped``."""
    files: list[str] = []
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            raise DataError(
                f"Cannot list the folder {folder} ({e.strerror or e}). Check that it exists and is "
                "readable, or remove it from the dataset."
            ) from None
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():  # follows links
                key = _identity(e.path)
                if key in seen:
                    skipped.append(e.path)
                    continue
                seen.add(key)
                stack.append(e.path)
            elif _is_image(e.name) and e.is_file():
                files.append(e.path)
    return sorted(files)


def scan_classes(folder: Path, classes: Optional[list[str]] = None) -> tuple[list[str], list[int], list[str]]:
    """Image files under each class folder of ``folder`` (recursively, sorted).

    Returns (paths, labels, classes); labels index ``classes``, which default to the
    folder's own sorted class folders.
    """
    found = _class_dirs(folder)
    if not found:
        loose = [e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name)]
        hint = (
            f" It holds {len(loose)} image files directly: images must be sorted into one folder "
            "per class (for ILSVRC-2012 val, e.g. with the usual valprep.sh script)."
            if loose else ""
        )
        raise DataError(f"No class folders in {folder}.{hint}")
    classes = found if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(
            f"{folder} has class folders that train/ does not have: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}. Both splits must use the same class folder names."
        )
    missing = [c for c in classes if c not in found]
    if missing:
        log.warning("%s has no folder for %d of %d classes (e.g. %s)", folder, len(missing), len(classes), missing[0])
    # The split folder and every class folder are claimed up front, so a link to one of
    # them from anywhere is skipped rather than scanned under the wrong class.
    seen = {_identity(folder)}
    owner: dict[tuple[int, int], str] = {}
    for name in found:
        key = _identity(folder / name)
        if key in owner:
            raise DataError(
                f"The class folders {folder / owner[key]} and {folder / name} are the same folder "
                "(one is a link to the other), so every image would count for both classes. "
                "Remove the link or give the class its own images."
            )
        owner[key] = name
    seen |= set(owner)
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    for name in found:
        files = _list_images(folder / name, seen, skipped)
        if not files:
            raise DataError(
                f"The class folder {folder / name} has no image files (looked for "
                f"{', '.join(IMG_EXTENSIONS)}). Remove the empty folder or add its images."
            )
        paths += files
        labels += [index[name]] * len(files)
    if skipped:
        log.warning(
            "%s: skipped %d link(s) to folders already scanned (a loop or a link into another "
            "class), e.g. %s", folder, len(skipped), skipped[0],
        )
    return paths, labels, classes


def _check_class_count(classes: list[str], folder: Path) -> None:
    if len(classes) < 2:
        raise DataError(
            f"{folder} has {len(classes)} class folder ({', '.join(classes)}); a classifier needs at "
            "least two classes, each in its own folder. Add the other classes' folders, or point "
            "data.root at the folder that holds them."
        )


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class, rounded, goes to val (at least one
    sample when the class has two or more), chosen by a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=g).tolist()
        n_val = min(max(round(fraction * len(members)), 1), len(members) - 1) if len(members) > 1 else 0
        val += [members[j] for j in order[:n_val]]
        train += [members[j] for j in order[n_val:]]
    return sorted(train), sorted(val)


def build_folder_datasets(
    root: Optional[str], name: str, val_fraction: float, split_seed: int
) -> tuple[ImageFiles, ImageFiles, list[str]]:
    """Check the layout of ``root`` and list its train and val images."""
    if not root:
        raise DataError(f"data.root is not set; data={name} needs it. " + _LAYOUT.format(root="<root>"))
    base = Path(root).expanduser().absolute()
    if not base.is_dir():
        what = "is not a folder" if base.exists() else "does not exist"
        shown = root if str(base) == root else f"{root} ({base})"
        raise DataError(f"data.root={shown} {what}. " + _LAYOUT.format(root=root))
    train_dir, val_dir = base / "train", base / "val"
    has_train, has_val = train_dir.is_dir(), val_dir.is_dir()
    if has_val and not has_train:
        raise DataError(f"{root} has val/ but no train/ folder. " + _LAYOUT.format(root=root))
    if has_train and has_val:
        train_paths, train_labels, classes = scan_classes(train_dir)
        _check_class_count(classes, train_dir)
        val_paths, val_labels, _ = scan_classes(val_dir, classes)
        return ImageFiles(train_paths, train_labels), ImageFiles(val_paths, val_labels), classes
    if val_fraction <= 0:
        missing = "no val/ folder" if has_train else "no train/ or val/ folder"
        raise DataError(
            f"{root} has {missing}. Add it, or set data.val_fraction (e.g. 0.1) to hold out a "
            "fixed, stratified part of the images for validation. " + _LAYOUT.format(root=root)
        )
    paths, labels, classes = scan_classes(train_dir if has_train else base)
    _check_class_count(classes, train_dir if has_train else base)
    train_idx, val_idx = stratified_split(labels, val_fraction, split_seed)
    if not val_idx:
        raise DataError(f"data.val_fraction={val_fraction} holds out no image of {root}: every class has one image.")
    return (
        ImageFiles([paths[i] for i in train_idx], [labels[i] for i in train_idx]),
        ImageFiles([paths[i] for i in val_idx], [labels[i] for i in val_idx]),
        classes,
    )
