"""Classify images with any trained artifact: :class:`Predictor`.

    >>> p = cdnv2.Predictor("runs/cdnv2_tiny-shapes/model_compact.pt")
    >>> p.predict(["cat.jpg", "dog.png"], topk=3)[0].label
    'cat'

The artifact brings its own eval preprocessing (resize, center crop, mean/std) and class
names: a compact ``.pt`` or ``.safetensors`` artifact and a training checkpoint record
them; an exported ``.onnx`` / OpenVINO ``.xml`` / AOTInductor ``.pt2`` has them in its
JSON sidecar (``model.onnx.json``, written by ``cdnv2-convert export=...``); an official release file
gets the official ImageNet preprocessing and numbered classes.

Files are opened by the loader registered for their suffix in :data:`LOADERS`; a new
format is one entry there (``LOADERS[".ext"] = load_ext``). Images are decoded as the
training data is (:func:`cdnv2.data.folders.load_image`: 16-bit scaled, RGB).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import open_checkpoint
from .data.folders import load_image
from .data.transforms import build_eval_transform, check_eval_preprocess
from .errors import CheckpointError, DataError

__all__ = ["LOADERS", "Backend", "Prediction", "Predictor"]


@dataclass
class Backend:
    """What a loader gives: a batch function and what the file records."""

    run: Callable[[torch.Tensor], torch.Tensor]  # normalised float NCHW batch -> logits (CPU)
    preprocess: dict  # resize, crop, interpolation, mean, std
    class_names: Optional[list[str]]
    description: str  # e.g. "cdnv2_tiny (compact, raw weights)" or "ONNX Runtime"


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    source: str  # the file, or "#<i>" for an in-memory image
    labels: list[str]
    indices: list[int]
    probs: list[float]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def as_dict(self) -> dict:
        return {"file": self.source, "label": self.label, "prob": self.prob,
                "topk": [{"label": lb, "index": i, "prob": p} for lb, i, p in zip(self.labels, self.indices, self.probs)]}


# ----------------------------------------------------------------------------- loaders
def load_torch(path: Path, device: torch.device, weights: str) -> Backend:
    """A compact artifact (.pt / .safetensors), a training checkpoint or an official file."""
    loaded = open_checkpoint(path, weights=weights)
    model = loaded.model.to(device).eval()

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).float().cpu()

    if loaded.kind == "compact":
        what = f"{loaded.model_name} (compact artifact)"
    else:
        what = f"{loaded.model_name} ({loaded.kind} checkpoint, {loaded.structure} model, {loaded.weights} weights)"
    return Backend(run, loaded.preprocess, loaded.class_names, what)


def load_onnx(path: Path, device: torch.device, weights: str) -> Backend:
    """An exported ONNX file in ONNX Runtime (CPU), with its sidecar's preprocessing."""
    from .deploy import require
    from .deploy.sessions import ort_session

    side = _read_sidecar(path)
    require(("onnx",))
    session = ort_session(path)
    return Backend(_numpy_runner(session), side["preprocess"], side.get("class_names"), "ONNX Runtime (CPU)")


def load_openvino(path: Path, device: torch.device, weights: str) -> Backend:
    """An exported OpenVINO IR (.xml + .bin) on OpenVINO's CPU plugin."""
    from .deploy import require
    from .deploy.sessions import openvino_session

    side = _read_sidecar(path)
    require(("openvino",))
    session = openvino_session(path)
    return Backend(_numpy_runner(session), side["preprocess"], side.get("class_names"), "OpenVINO (CPU)")


def load_pt2(path: Path, device: torch.device, weights: str) -> Backend:
    """An AOTInductor package (``cdnv2-convert export=aoti``), compiled for the CPU."""
    from .deploy.aoti import load_aoti

    side = _read_sidecar(path)
    runner = load_aoti(path)

    def run(x: torch.Tensor) -> torch.Tensor:
        return runner(x.cpu().contiguous()).float()

    return Backend(run, side["preprocess"], side.get("class_names"), "AOTInductor package (CPU)")


# The loader of each file suffix (anything else: load_torch, whose reader names the problem).
LOADERS: dict[str, Callable[[Path, torch.device, str], Backend]] = {
    ".pt": load_torch,
    ".pth": load_torch,
    ".tar": load_torch,
    ".safetensors": load_torch,
    ".onnx": load_onnx,
    ".xml": load_openvino,
    ".pt2": load_pt2,
}


def _numpy_runner(session: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session(x.cpu().numpy()))).float()

    return run


def _read_sidecar(path: Path) -> dict:
    """``model.onnx.json`` (an int8 copy ``model.int8.onnx`` uses its fp32 file's)."""
    names = [path.name + ".json"]
    if ".int8." in path.name:
        names.append(path.name.replace(".int8.", ".") + ".json")
    for name in names:
        side = path.with_name(name)
        if side.is_file():
            try:
                info = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{side}: cannot read the sidecar of {path} ({e})") from None
            if not isinstance(info, dict) or not info.get("preprocess"):
                raise CheckpointError(f"{side} records no preprocess; re-export {path} with cdnv2-convert export=...")
            try:
                check_eval_preprocess(info["preprocess"], str(side))
            except DataError as e:
                raise CheckpointError(str(e)) from None
            names = info.get("class_names")
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise CheckpointError(f"{side}: class_names must be a list of strings, got {str(names)[:100]!r}")
            return info
    raise CheckpointError(
        f"{path} has no sidecar {path.with_name(names[0])} with its preprocessing and class names; it is "
        "written beside the file by cdnv2-convert export=onnx|openvino: keep the two files together "
        "(or re-export)"
    )


# ----------------------------------------------------------------------------- the predictor
class Predictor:
    """Top-k classes of images with the model in ``path`` and its own preprocessing.

    ``path``: a compact ``.pt`` / ``.safetensors`` artifact, a training checkpoint, an
    official release file, an exported ``.onnx`` or OpenVINO ``.xml`` (see :data:`LOADERS`).
    ``weights``: "auto" | "ema" | "raw" (training checkpoints). ``device`` is where a
    PyTorch model runs ("cpu", "cuda", a torch.device); exported files run on the CPU.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", weights: str = "auto",
                 batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file")
        loader = LOADERS.get(self.path.suffix.lower(), load_torch)
        self.backend = loader(self.path, torch.device(device), weights)
        if not self.backend.preprocess:
            raise CheckpointError(f"{self.path} records no eval preprocessing (resize, crop, mean, std)")
        self.transform = build_eval_transform(self.backend.preprocess)
        self.batch_size = batch_size

    @property
    def preprocess(self) -> dict:
        return self.backend.preprocess

    @property
    def class_names(self) -> Optional[list[str]]:
        return self.backend.class_names

    @property
    def description(self) -> str:
        return self.backend.description

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (CPU, float) of an already preprocessed NCHW batch."""
        return self.backend.run(batch)

    def predict(self, images: Sequence[Any] | Any, topk: int = 5) -> list[Prediction]:
        """Top-k predictions of ``images``: file paths, PIL images, HWC uint8 arrays or CHW
        uint8 tensors (one of them or a list). An unreadable file raises DataError; see
        :meth:`predict_files` to collect those instead."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        items = [(str(im) if isinstance(im, (str, Path)) else f"#{i}", im) for i, im in enumerate(images)]
        predictions, _ = self._run(items, topk, skip_unreadable=False)
        return predictions

    def predict_files(self, paths: Iterable[str | Path], topk: int = 5,
                      progress: Callable[[int], Any] | None = None,
                      workers: int = 0) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """(predictions, unreadable) for image files; an unreadable file is listed as
        ``(path, reason)``, not raised. ``progress(n)`` is called after each batch;
        ``workers`` > 0 decodes the batches in that many loader processes."""
        return self._run([(str(p), p) for p in paths], topk, skip_unreadable=True, progress=progress,
                         workers=workers)

    # ------------------------------------------------------------------------- internals
    def _run(self, items: list[tuple[str, Any]], topk: int, skip_unreadable: bool,
             progress: Callable[[int], Any] | None = None,
             workers: int = 0) -> tuple[list[Prediction], list[tuple[str, str]]]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        batches = _Batches(items, self.batch_size, self.transform)
        if workers > 0:  # batch_size=None: each item already is a batch, in order
            batches = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers)
        predictions: list[Prediction] = []
        unreadable: list[tuple[str, str]] = []
        for sources, images, failed in batches:
            if failed and not skip_unreadable:
                raise DataError(failed[0][1])
            unreadable += [(source, _reason(message, source)) for source, message in failed]
            if images is not None:
                predictions += self._top(sources, self.logits(images), topk)
            if progress is not None:
                progress(len(sources) + len(failed))
        return predictions, unreadable

    def _top(self, sources: list[str], logits: torch.Tensor, topk: int) -> list[Prediction]:
        probs = logits.softmax(dim=1)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        names = self.class_names
        out = []
        for source, v, i in zip(sources, values.tolist(), indices.tolist()):
            labels = [names[j] if names and j < len(names) else str(j) for j in i]
            out.append(Prediction(source, labels, i, v))
        return out


PREDICT_FIX = "replace or delete it (cdnv2-predict lists it as unreadable and classifies the others)."


def _decode(image: Any):
    """A file path -> RGB PIL image; other inputs as the eval transform takes them."""
    if isinstance(image, (str, Path)):
        return load_image(str(image), fix=PREDICT_FIX)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, torch.Tensor):
        return image
    raise TypeError(f"cannot classify a {type(image).__name__}: give a path, PIL image, array or tensor")


class _Batches(torch.utils.data.Dataset):
    """Batch ``k`` of ``items``: (sources, preprocessed images or None, [(source, error)])."""

    def __init__(self, items: list[tuple[str, Any]], batch_size: int, transform: Callable):
        self.chunks = list(_chunks(items, batch_size))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        sources, tensors, failed = [], [], []
        for source, image in self.chunks[k]:
            try:
                tensors.append(self.transform(_decode(image)))
                sources.append(source)
            except DataError as e:
                failed.append((source, str(e)))
        return sources, torch.stack(tensors) if tensors else None, failed


def _reason(text: str, source: str) -> str:
    """The decoder's own words, without the training-data advice of load_image's message."""
    head = f"Cannot read the image {source} ("
    end = text.find("). ", len(head))
    reason = text[len(head):end] if text.startswith(head) and end > 0 else text
    return re.sub(r"\s*<_io\.\w+ name=.*?>", "", reason)  # PIL names the file object, not the file


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
