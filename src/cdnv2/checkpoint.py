"""The checkpoint file format: one read / validate / save path for every command.

A cdnv2 checkpoint is a plain dict of tensors and primitives (``torch.load(weights_only=
True)`` reads it) with ``format="cdnv2"``, a :class:`Kind` and the model's
:class:`~cdnv2.compact.Structure`, so the file alone rebuilds its model:

- ``kind="train"``: written by the trainer every epoch; resumable. Its keys are
  :data:`TRAIN_RUN_KEYS` (the run: model, classes, config, identity) and
  :data:`TRAIN_STATE_KEYS` (a :class:`cdnv2.engine.state.TrainState`: model, EMA,
  optimizer, RNG, progress), in version :data:`TRAIN_VERSION`.
- ``kind="compact"``: the compact inference artifact (:func:`save_compact`).

Official CondenseNetV2 release files (``kind`` "official" once read) are foreign: they are
recognised and mapped by :mod:`cdnv2.compact.official` after :func:`read_file` read them.

Writes are atomic (:mod:`cdnv2.atomic_files`: a temporary file, fsync, rename), so a
kill at any moment leaves either the old or the new file, never a partial one.

Entry points: :func:`load_checkpoint` (trainer resume), :func:`load_model`
(``cdnv2.load_model``), :func:`open_checkpoint` (the commands: any file, with what it
records), :func:`load_official_checkpoint`, :func:`save_compact`.
"""
from __future__ import annotations

import argparse
import enum
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .compact import Structure, model_structure, restructure_for_state_dict
from .compact import official
from . import atomic_files, safetensors_io
from .data.config import memory_bytes
from .data.transforms import check_eval_preprocess
from .errors import CheckpointError, DataError
from .models import create_model, is_model, unknown_model_message
from .models import features_only as features_only_net
from .safe_pickle import pickled_globals

log = logging.getLogger(__name__)

FORMAT = "cdnv2"
ARTIFACT_VERSION = 1
WEIGHTS = ("auto", "ema", "raw")
SAVE_FORMATS = ("auto", "pt", "safetensors")


class Kind(str, enum.Enum):
    TRAIN = "train"  # trainer checkpoint
    COMPACT = "compact"  # compact inference artifact
    OFFICIAL = "official"  # an official release file (read, never written)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


_REQUIRED = {
    Kind.TRAIN: ("format", "kind", "model_name", "model_kwargs", "structure", "model_state", "ema_state"),
    Kind.COMPACT: ("format", "kind", "version", "model_name", "model_kwargs", "structure", "model_state"),
}

# kind="train", version TRAIN_VERSION: the run it belongs to (checked on resume, read by the
# commands; nothing of it is restored) ...
TRAIN_VERSION = 1
TRAIN_RUN_KEYS = (
    "model_name", "model_kwargs", "class_names", "preprocess", "data_name", "config", "run_identity",
    "total_steps",
)
# ... and its cdnv2.engine.state.TrainState (state_dict() writes these, a resume restores them).
TRAIN_STATE_KEYS = (
    "structure", "model_state", "ema_state", "ema_updates", "optimizer", "scaler", "step", "epoch",
    "batch_in_epoch", "best_top1", "bad_steps", "train_seconds", "rng", "metrics",
)


def train_checkpoint(run: dict, state: dict) -> dict:
    """A ``kind="train"`` file's dict: the run's ``TRAIN_RUN_KEYS`` and a TrainState's keys."""
    return {"format": FORMAT, "kind": Kind.TRAIN.value, "version": TRAIN_VERSION, **run, **state}


def check_resumable(obj: dict, where: str) -> None:
    """A validated training checkpoint holds everything a resume restores, in a known version."""
    version = obj.get("version", TRAIN_VERSION)
    if not isinstance(version, int) or version > TRAIN_VERSION:
        raise CheckpointError(
            f"{where}: training checkpoint version {version!r} is newer than this cdnv2 reads "
            f"({TRAIN_VERSION}); resume it with the cdnv2 that wrote it, or start afresh with resume=never"
        )
    missing = [k for k in TRAIN_RUN_KEYS + TRAIN_STATE_KEYS if k not in obj]
    if missing:
        raise CheckpointError(
            f"{where}: training checkpoint lacks key(s) {', '.join(missing)} and cannot be resumed; "
            "its weights still load with cdnv2-eval / cdnv2.load_model, or start afresh with resume=never"
        )


def save_compact(path: str | os.PathLike, compact_model: nn.Module, *, model_name: str, model_kwargs: dict,
                 class_names: list[str] | None = None, preprocess: dict | None = None,
                 metrics: dict | None = None, data: dict | None = None, seed: int | None = None,
                 format: str = "auto") -> Path:
    """Write the compact inference model as ONE self-describing file (``kind="compact"``).

    ``load_model(path)`` rebuilds the model from it alone. ``data`` (the run's data config
    as a dict) and ``seed`` let ``cdnv2-eval`` rebuild the validation set without ``data=...``.
    ``format``: "pt" (a ``torch.save`` dict), "safetensors" (weights as safetensors, the
    other fields as JSON strings in its metadata; read without pickle, the format to share;
    see :mod:`cdnv2.safetensors_io`) or "auto": safetensors for a ``.safetensors`` path.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r}: use one of {', '.join(SAVE_FORMATS)}")
    if format == "auto":
        format = "safetensors" if safetensors_io.is_safetensors(path) else "pt"
    structure = model_structure(compact_model)
    if structure is not Structure.COMPACT:
        raise ValueError(
            f"save_compact needs the compact inference model (convert_model(...)); this model is {structure}"
        )
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in compact_model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "kind": Kind.COMPACT.value,
        "version": ARTIFACT_VERSION,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "structure": Structure.COMPACT.value,
        "model_state": state,
        "class_names": list(class_names) if class_names is not None else None,
        "preprocess": preprocess,
        "metrics": metrics,
        "data": data,
        "seed": seed,
    }
    path = Path(path)
    if format == "safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        return safetensors_io.write(obj, path)
    atomic_files.atomic_save(obj, path)
    return path


# ============================================================================= reading
def read_file(path: str | Path, *, label: str | None = None, trust_pickle: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU with a clear :class:`CheckpointError` for every
    way it can fail. ``label`` names the file in messages (e.g. ``checkpoint=PATH``).

    Only tensors and plain data are unpickled (``weights_only=True``, plus the argparse
    Namespace and numpy scalars that official files carry) unless ``trust_pickle``.
    A ``.safetensors`` file is read without pickle (:func:`cdnv2.safetensors_io.read`).
    """
    path = Path(path).expanduser()
    where = label or str(path)
    if not path.exists():
        raise CheckpointError(f"{where}: no such file{_neighbours(path)}")
    if path.is_dir():
        found = [p for p in ("model_compact.pt", "checkpoints/last.pt", "checkpoints/best.pt") if (path / p).is_file()]
        hint = f"; this looks like a run directory, e.g. checkpoint={path / found[0]}" if found else ""
        raise CheckpointError(f"{where} is a directory, not a checkpoint file{hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes) and cannot be read: it was never written completely")
    if safetensors_io.is_safetensors(path):
        return safetensors_io.read(path, where)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_data_only_globals()), warnings.catch_warnings():
            # a raw pickle of protocol 3+ warns before it fails; the failure says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, random bytes ...
        raise _unreadable(where, e, path) from None


def _unreadable(where: str, e: Exception, path: Path) -> CheckpointError:
    text = str(e)
    named = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", text)
    blocked = named.group(1) if named and "is blocked" in text else None
    if not named and not zipfile.is_zipfile(path):
        # torch's weights-only reader stops at opcodes of newer pickle protocols before it
        # reaches a global; what the raw pickle would call is still in its opcodes.
        blocked = _first_code_global(path)
    resave = ("If you trust the file, load it with torch.load(weights_only=False) and re-save just "
              "its weights, e.g. torch.save({'state_dict': ckpt['state_dict']}, path)")
    if blocked:
        return CheckpointError(
            f"{where} contains code that cannot be loaded safely: unpickling it would call "
            f"{blocked}, and only tensors and plain data are loaded. Do not load it unless "
            f"you trust its source. {resave}"
        )
    if named:
        return CheckpointError(
            f"{where} cannot be read safely: it holds a Python object of type {named.group(1)}, and "
            f"only tensors and plain data are loaded (torch.load weights_only=True). {resave}"
        )
    first = (text.strip().splitlines() or [""])[0][:200]
    return CheckpointError(
        f"{where}: cannot be read ({type(e).__name__}: {first}); it is truncated, corrupted or not "
        "a PyTorch checkpoint"
    )


def _first_code_global(path: Path) -> str | None:
    """The first global a (non-zip) pickle names beyond what ``weights_only`` loading
    allows, found by parsing its opcodes, without unpickling."""
    try:
        with open(path, "rb") as f:
            return next((g for g in pickled_globals(f) if g not in _weights_only_names()), None)
    except OSError:
        return None


def _weights_only_names() -> set[str]:
    """``module.name`` of the globals :func:`read_file` lets ``torch.load`` reconstruct."""
    names = {f"{g.__module__}.{g.__qualname__}" for g in _data_only_globals()}
    names |= {f"{m}.{t}" for m in ("builtins", "__builtin__") for t in (
        "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool",
        "complex", "slice", "range")}
    try:  # torch's own allowlist (tensor, storage and dtype rebuilders); private, so guarded
        from torch._weights_only_unpickler import _get_allowed_globals

        names |= set(_get_allowed_globals())
    except (ImportError, AttributeError):
        names |= {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict"}
    names |= {f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short",
                                            "Char", "Byte", "Bool")}
    return names


def _neighbours(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return ""
    near = sorted(p.name for p in parent.iterdir() if p.suffix in (".pt", ".pth", ".tar"))[:6]
    return f" ({parent} holds: {', '.join(near)})" if near else ""


def _data_only_globals() -> list:
    """Plain-data classes that official (timm-trained) files pickle beside the weights: the
    argparse Namespace of the run's arguments and numpy scalars of its metrics."""
    extra: list = [argparse.Namespace]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        extra += [core.multiarray.scalar, np.dtype]
        extra += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except (ImportError, AttributeError, TypeError):
        pass
    return extra


def describe(obj: Any) -> str:
    """'a dict with keys a, b, ...' / 'a list': what a foreign file holds."""
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
    return f"a {type(obj).__name__}"


def is_cdnv2(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def validate(obj: Any, where: str) -> None:
    """Raise :class:`CheckpointError` unless ``obj`` is a complete cdnv2 checkpoint."""
    if not is_cdnv2(obj):
        raise CheckpointError(
            f"{where} is not a cdnv2 checkpoint (it holds {describe(obj)}, no format='cdnv2'); official "
            "CondenseNetV2 release files are read with official=<variant> in cdnv2-eval / cdnv2-convert "
            "or cdnv2.load_official_checkpoint"
        )
    kinds = [k.value for k in _REQUIRED]
    if obj.get("kind") not in kinds:
        raise CheckpointError(f"{where}: unknown checkpoint kind {obj.get('kind')!r} (expected one of {kinds})")
    missing = [k for k in _REQUIRED[Kind(obj["kind"])] if k not in obj]
    if missing:
        raise CheckpointError(f"{where}: {obj['kind']} checkpoint lacks key(s) {', '.join(missing)}")
    structures = [s.value for s in Structure]
    if obj["structure"] not in structures:
        raise CheckpointError(f"{where}: unknown structure {obj['structure']!r}; expected one of {structures}")
    if not isinstance(obj["model_state"], dict):
        raise CheckpointError(f"{where}: model_state is not a state dict")
    if obj["kind"] == Kind.COMPACT.value:
        _check_artifact_version(obj.get("version"), where)
    _validate_metadata(obj, where)


def _check_artifact_version(version: Any, where: str) -> None:
    """A compact artifact from a newer cdnv2 may hold fields this one would ignore: refuse it."""
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= ARTIFACT_VERSION:
        raise CheckpointError(
            f"{where}: compact artifact version {version!r} is not one this cdnv2 reads (1 to "
            f"{ARTIFACT_VERSION}); it was written by a newer cdnv2 or edited: upgrade cdnv2 "
            "(pip install -U cdnv2) or re-export it with this version's cdnv2-convert"
        )


def _validate_metadata(obj: dict, where: str) -> None:
    """The recorded fields the commands use are of the types written (an edited file's are not)."""
    if not isinstance(obj["model_name"], str) or not isinstance(obj["model_kwargs"], (dict, type(None))):
        raise CheckpointError(f"{where}: model_name must be a string and model_kwargs a dict (got "
                              f"{type(obj['model_name']).__name__} and {type(obj['model_kwargs']).__name__})")
    names = obj.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{where}: class_names must be a list of strings, got {str(names)[:100]!r}")
    if obj.get("preprocess") is not None:
        try:
            check_eval_preprocess(obj["preprocess"], where, complete=False)  # a partial one: see Predictor
        except DataError as e:
            raise CheckpointError(str(e)) from None


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a cdnv2 checkpoint file (its dict, tensors on the CPU)."""
    obj = read_file(path)
    validate(obj, str(path))
    return obj


def find_resume_checkpoint(folder: str | Path) -> tuple[dict, Path] | None:
    """The newest readable checkpoint among last.pt and prev.pt, warning about bad ones.

    Reads only: stale temporary files are removed by the run directory's owner, under
    its lock (:class:`cdnv2.engine.run_dir.RunDir`), never here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name, fallback in (("last.pt", "falling back to the previous checkpoint (prev.pt)"), ("prev.pt", "")):
        path = folder / name
        if not path.exists():
            continue
        try:
            return load_checkpoint(path), path
        except CheckpointError as e:
            log.warning("%s%s", e, f"; {fallback}" if fallback else "")
    return None


# ============================================================================= models
def _build_model(obj: dict, where: str, weights: str) -> tuple[nn.Module, str]:
    """The model of a validated cdnv2 checkpoint (eval mode, CPU) and the weights used."""
    state, used = obj["model_state"], "raw"
    if obj["kind"] == Kind.TRAIN and weights == "ema" and obj.get("ema_state") is not None:
        state, used = obj["ema_state"], "ema"
    kwargs = dict(obj["model_kwargs"] or {})
    try:
        with torch.device("meta"):  # first without memory: the file's sizes are not trusted
            elements = sum(t.numel() for t in create_model(obj["model_name"], **kwargs).state_dict().values())
        _check_fits(elements, state, where)
        model = create_model(obj["model_name"], **kwargs)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:  # torch's C++ errors add frames
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{where}: cannot build model {obj['model_name']!r}: {first}") from None
    if obj["structure"] != Structure.MASKED:
        restructure_for_state_dict(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{where}: weights do not fit {obj['model_name']} ({obj['structure']}): "
            + " ".join(str(e).split())[:600]
        ) from None
    return model.eval(), used


def _check_fits(elements: int, state: dict, where: str) -> None:
    """A recorded architecture far larger than the weights stored beside it (or than
    memory) is refused before it is allocated. The masked model of a compact file is a
    few times larger than its pruned weights; 64 times is no longer the same model."""
    stored = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    memory = memory_bytes()
    if elements > 64 * stored + 10**7 or (memory is not None and 4 * elements > memory // 2):
        raise CheckpointError(
            f"{where}: its recorded architecture has {elements:,} weights but the file stores "
            f"{stored:,}; the file is inconsistent (or edited) and is not loaded"
        )


def load_model(path_or_dict: str | os.PathLike | dict, *, weights: str = "ema",
               device: str | torch.device = "cpu", features_only: bool = False,
               out_indices=None) -> nn.Module:
    """Rebuild the model of any cdnv2 checkpoint, in eval mode, on ``device``.

    ``weights``: for training checkpoints, "ema" (the EMA weights when the checkpoint has
    them, else the raw ones) or "raw". The model carries ``model.cdnv2_meta`` with
    class_names, preprocess, model_name, model_kwargs, structure and the weights used.
    ``features_only``: return the backbone instead (``cdnv2.models.features_only``): the
    maps after the dense blocks selected by ``out_indices`` (default all).
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if isinstance(path_or_dict, dict):
        obj, where = path_or_dict, "<checkpoint dict>"
    else:
        obj, where = read_file(path_or_dict), str(path_or_dict)
    validate(obj, where)
    model, used = _build_model(obj, where, weights)
    model.to(device)
    model.cdnv2_meta = {
        "class_names": obj.get("class_names"),
        "preprocess": obj.get("preprocess"),
        "model_name": obj["model_name"],
        "model_kwargs": obj["model_kwargs"],
        "structure": Structure(obj["structure"]),
        "weights": used,
    }
    if features_only:
        return features_only_net(model, out_indices).eval()
    if out_indices is not None:
        raise ValueError("out_indices needs features_only=True")
    return model


def load_official_checkpoint(path_or_state_dict: str | os.PathLike | dict, model_name: str, *,
                             use_ema: bool = False, trust_pickle: bool = False) -> nn.Module:
    """Build ``model_name`` (cdnv2_a / cdnv2_b / cdnv2_c ...) from an official release file.

    Unconverted files give our masked model, converted files our compact model; either
    is returned in eval mode and computes what the official model computes.
    ``path_or_state_dict``: a file, a dict with ``state_dict`` / ``state_dict_ema``, or
    a bare state dict; ``module.`` prefixes are fine. ``use_ema`` picks ``state_dict_ema``.
    ``trust_pickle``: unpickle any Python object in the file (only for files you trust).
    """
    if isinstance(path_or_state_dict, dict):
        obj, where = path_or_state_dict, "<official state dict>"
    else:
        obj, where = read_file(path_or_state_dict, trust_pickle=trust_pickle), str(path_or_state_dict)
    return official.build_official_model(official.pick_state_dict(obj, where, use_ema), model_name, where)


# ============================================================================= the commands
@dataclass
class Loaded:
    """A rebuilt model and what its file records (:func:`open_checkpoint`)."""

    model: nn.Module  # eval mode, CPU
    path: Path
    kind: Kind
    model_name: str
    model_kwargs: dict
    structure: Structure
    weights: str  # ema | raw
    class_names: Optional[list[str]]
    preprocess: Optional[dict]
    data_config: Optional[dict]  # a DataConfig as a dict, when recorded
    seed: Optional[int]
    trainer: dict = field(default_factory=dict)  # the training run's trainer config, if any
    metrics: dict = field(default_factory=dict)  # metrics recorded in the file
    raw: dict = field(default_factory=dict, repr=False)  # the file's dict

    @property
    def input_size(self) -> tuple[int, int, int]:
        crop = int((self.preprocess or {}).get("crop") or 224)
        return (int(self.model_kwargs.get("in_chans", 3)), crop, crop)

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs.get("num_classes", 1000))

    def masked_reference(self) -> nn.Module:
        """A masked model of the same architecture (weights do not matter for cost/timing)."""
        if self.structure is Structure.MASKED:
            return self.model
        return create_model(self.model_name, **self.model_kwargs).eval()


def open_checkpoint(path: str | Path, *, weights: str = "auto", official_name: Optional[str] = None) -> Loaded:
    """Rebuild the model behind ``checkpoint=path`` (CPU, eval mode) with its recorded
    metadata: a training checkpoint, a compact artifact or an official release file
    (``official_name``: its variant; None: detected from the keys)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r}: use one of {', '.join(WEIGHTS)}")
    path = Path(path).expanduser()
    where = f"checkpoint={path}"
    obj = read_file(path, label=where)
    if is_cdnv2(obj) and official_name is None:
        return _open_cdnv2(path, where, obj, weights)
    sd = official.official_state_dict(obj)
    if sd is None:
        if official_name is not None:
            raise CheckpointError(
                f"{where} is not an official CondenseNetV2 file (it holds {describe(obj)}; "
                "expected a dict with state_dict whose keys start with features. or module.features.)"
            )
        raise CheckpointError(
            f"{where} is not a cdnv2 checkpoint or an official CondenseNetV2 file (it holds {describe(obj)})"
        )
    return _open_official(path, where, obj, sd, weights, official_name)


def _open_cdnv2(path: Path, where: str, obj: dict, weights: str) -> Loaded:
    validate(obj, where)
    if obj["kind"] == Kind.TRAIN and weights == "ema" and obj.get("ema_state") is None:
        raise CheckpointError(
            f"weights=ema, but {path} was trained without an EMA (trainer.ema_decay was null); "
            "use weights=raw or weights=auto"
        )
    model, used = _build_model(obj, where, "raw" if weights == "raw" else "ema")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    data_config = config.get("data") or obj.get("data")
    seed = config.get("seed", obj.get("seed"))
    return Loaded(
        model=model, path=path, kind=Kind(obj["kind"]), model_name=obj["model_name"],
        model_kwargs=dict(obj["model_kwargs"] or {}), structure=Structure(obj["structure"]), weights=used,
        class_names=list(obj["class_names"]) if obj.get("class_names") is not None else None,
        preprocess=obj.get("preprocess"), data_config=dict(data_config) if data_config else None,
        seed=int(seed) if seed is not None else None, trainer=dict(config.get("trainer") or {}),
        metrics=dict(obj.get("metrics") or {}), raw=obj,
    )


def _open_official(path: Path, where: str, obj: dict, sd: dict, weights: str, name: Optional[str]) -> Loaded:
    name = name or official.guess_official_variant(sd)
    if name is None:
        raise CheckpointError(
            f"{where} looks like an official CondenseNetV2 file, but its dense blocks match none of "
            f"{', '.join(official.OFFICIAL_VARIANTS)}; name the variant with official=<model>"
        )
    if not is_model(name):
        raise CheckpointError(f"official={name!r}: {unknown_model_message(name)}")
    has_ema = isinstance(obj.get("state_dict_ema"), dict)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"weights=ema, but {path} has no state_dict_ema; use weights=raw or weights=auto")
    use_ema = has_ema and weights != "raw"
    try:
        model = official.build_official_model(official.pick_state_dict(obj, where, use_ema), name,
                                              f"{where} (official={name})")
    except (KeyError, RuntimeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{where} does not fit the official layout of {name}: " + " ".join(str(e).split())[:400]
        ) from None
    kwargs = model.arch_kwargs() if hasattr(model, "arch_kwargs") else {}
    return Loaded(
        model=model, path=path, kind=Kind.OFFICIAL, model_name=name, model_kwargs=dict(kwargs),
        structure=model_structure(model), weights="ema" if use_ema else "raw",
        class_names=None, preprocess=official.official_preprocess(name), data_config=None, seed=None, raw=obj,
    )
