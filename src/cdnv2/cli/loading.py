"""Open whatever ``checkpoint=PATH`` points at: a training checkpoint, a compact
artifact or an official CondenseNetV2 release file, with everything recorded about it.

Shared by cdnv2-eval, cdnv2-convert and cdnv2-viz. Every failure is a
:class:`CheckpointError` (one paragraph, no traceback): missing path, directory,
empty, truncated or foreign file, unknown official layout.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import convert as convert_mod
from ..errors import CheckpointError
from ..models import create_model, is_model, unknown_model_message

# Both modules define the error today; the CLI catches either.
CHECKPOINT_ERRORS: tuple = tuple({CheckpointError, getattr(convert_mod, "CheckpointError", CheckpointError)})

WEIGHTS = ("auto", "ema", "raw")
OFFICIAL_VARIANTS = ("cdnv2_a", "cdnv2_b", "cdnv2_c")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class Loaded:
    """A rebuilt model and what its file records."""

    model: nn.Module  # eval mode, CPU
    path: Path
    kind: str  # train | compact | official
    model_name: str
    model_kwargs: dict
    structure: str  # masked | compact_train | compact
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


# ----------------------------------------------------------------------------- the file
def read_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with a clear error for every way it can fail."""
    path = Path(path).expanduser()
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        hint = ""
        if parent.is_dir():
            near = sorted(p.name for p in parent.iterdir() if p.suffix in (".pt", ".pth", ".tar"))[:6]
            if near:
                hint = f" ({parent} holds: {', '.join(near)})"
        raise CheckpointError(f"checkpoint={path}: no such file{hint}")
    if path.is_dir():
        found = [p for p in ("model_compact.pt", "checkpoints/last.pt", "checkpoints/best.pt") if (path / p).is_file()]
        hint = f"; this looks like a run directory, e.g. checkpoint={path / found[0]}" if found else ""
        raise CheckpointError(f"checkpoint={path} is a directory, not a checkpoint file{hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint={path} is empty (0 bytes): it was never written completely")
    try:
        with torch.serialization.safe_globals(_data_only_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, random bytes ...
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"checkpoint={path} cannot be read safely: it holds a Python object of type "
                f"{unsafe.group(1)}, and only tensors and plain data are loaded (torch.load "
                "weights_only=True). Re-save just its state dict, e.g. torch.save({'state_dict': "
                "ckpt['state_dict']}, path), if you trust the file"
            ) from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint={path} cannot be read ({type(e).__name__}: {first}); it is truncated, corrupted "
            "or not a PyTorch checkpoint"
        ) from None


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


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
    return f"a {type(obj).__name__}"


def official_state_dict(obj: Any) -> Optional[dict]:
    """The state dict of an official release file, or None if ``obj`` does not look like one."""
    if not isinstance(obj, dict) or obj.get("format") == "cdnv2":
        return None
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        return None
    if not all(torch.is_tensor(v) for v in sd.values()):
        return None
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    markers = ("features.init_conv.", "features.denseblock_", "._mask", "conv_1.index", "sfr.index")
    if any(any(m in k for m in markers) for k in keys):
        return sd
    return None


def guess_official_variant(state_dict: dict) -> Optional[str]:
    """cdnv2_a / _b / _c from the number of dense layers per block in the keys."""
    layers: dict[int, set[int]] = {}
    for key in state_dict:
        m = re.search(r"features\.denseblock_(\d+)\.denselayer_(\d+)\.", key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not layers:
        return None
    stages = tuple(len(layers[b]) for b in sorted(layers))
    for name in OFFICIAL_VARIANTS:
        with torch.device("meta"):  # the architecture only: no memory, no init cost
            variant = create_model(name)
        if tuple(variant.cfg.stages) == stages:
            return name
    return None


def official_preprocess(model_name: str) -> dict:
    """The official test script's eval transform (SPEC 8)."""
    return {
        "resize": 256,
        "crop": 224,
        "interpolation": "bilinear" if model_name == "cdnv2_c" else "bicubic",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


# ----------------------------------------------------------------------------- loading
def load_checkpoint_any(path: str | Path, *, weights: str = "auto", official: Optional[str] = None) -> Loaded:
    """Rebuild the model behind ``path`` (CPU, eval mode) with its recorded metadata."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r}: use one of {', '.join(WEIGHTS)}")
    path = Path(path).expanduser()
    obj = read_file(path)
    if isinstance(obj, dict) and obj.get("format") == "cdnv2" and official is None:
        return _load_cdnv2(path, obj, weights)
    sd = official_state_dict(obj)
    if sd is None:
        if official is not None:
            raise CheckpointError(
                f"checkpoint={path} is not an official CondenseNetV2 file (it holds {_describe(obj)}; "
                "expected a dict with state_dict whose keys start with features. or module.features.)"
            )
        raise CheckpointError(
            f"checkpoint={path} is not a cdnv2 checkpoint or an official CondenseNetV2 file "
            f"(it holds {_describe(obj)})"
        )
    return _load_official(path, obj, sd, weights, official)


def _load_cdnv2(path: Path, obj: dict, weights: str) -> Loaded:
    kind = obj.get("kind")
    if kind == "train" and weights == "ema" and obj.get("ema_state") is None:
        raise CheckpointError(
            f"weights=ema, but {path} was trained without an EMA (trainer.ema_decay was null); "
            "use weights=raw or weights=auto"
        )
    try:
        model = convert_mod.load_model(obj, weights="raw" if weights == "raw" else "ema")
    except CHECKPOINT_ERRORS as e:
        raise CheckpointError(str(e).replace("<checkpoint dict>", str(path))) from None
    meta = model.cdnv2_meta
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    data_config = config.get("data") or obj.get("data")
    seed = config.get("seed", obj.get("seed"))
    return Loaded(
        model=model, path=path, kind=kind, model_name=meta["model_name"],
        model_kwargs=dict(meta["model_kwargs"] or {}), structure=meta["structure"], weights=meta["weights"],
        class_names=list(meta["class_names"]) if meta.get("class_names") is not None else None,
        preprocess=meta.get("preprocess"), data_config=dict(data_config) if data_config else None,
        seed=int(seed) if seed is not None else None, trainer=dict(config.get("trainer") or {}),
        metrics=dict(obj.get("metrics") or {}), raw=obj,
    )


def _load_official(path: Path, obj: dict, sd: dict, weights: str, official: Optional[str]) -> Loaded:
    from .. import official as official_mod

    name = official or guess_official_variant(sd)
    if name is None:
        raise CheckpointError(
            f"checkpoint={path} looks like an official CondenseNetV2 file, but its dense blocks match "
            f"none of {', '.join(OFFICIAL_VARIANTS)}; name the variant with official=<model>"
        )
    if not is_model(name):
        raise CheckpointError(f"official={name!r}: {unknown_model_message(name)}")
    has_ema = isinstance(obj.get("state_dict_ema"), dict)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"weights=ema, but {path} has no state_dict_ema; use weights=raw or weights=auto")
    use_ema = has_ema and weights != "raw"
    try:
        model = official_mod.load_official_checkpoint(obj, name, use_ema=use_ema)
    except CHECKPOINT_ERRORS as e:
        raise CheckpointError(f"checkpoint={path} (official={name}): {e}") from None
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint={path} does not fit the official layout of {name}: "
            + " ".join(str(e).split())[:400]
        ) from None
    model.eval()
    kwargs = model.arch_kwargs() if hasattr(model, "arch_kwargs") else {}
    return Loaded(
        model=model, path=path, kind="official", model_name=name, model_kwargs=dict(kwargs),
        structure=convert_mod.model_structure(model), weights="ema" if use_ema else "raw",
        class_names=None, preprocess=official_preprocess(name), data_config=None, seed=None, raw=obj,
    )


def masked_reference(loaded: Loaded) -> nn.Module:
    """A masked model of the same architecture (weights do not matter for cost/timing)."""
    if loaded.structure == "masked":
        return loaded.model
    return create_model(loaded.model_name, **loaded.model_kwargs).eval()


def describe_class_mismatch(ours: list[str], theirs: list[str], limit: int = 4) -> Optional[str]:
    """None if the class lists agree, else a short description of the differences."""
    if list(ours) == list(theirs):
        return None
    only_ckpt = [c for c in ours if c not in set(theirs)]
    only_data = [c for c in theirs if c not in set(ours)]
    parts = [f"the checkpoint has {len(ours)} classes, the data {len(theirs)}"]

    def show(items):
        return ", ".join(map(repr, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    if only_ckpt:
        parts.append(f"only in the checkpoint: {show(only_ckpt)}")
    if only_data:
        parts.append(f"only in the data: {show(only_data)}")
    if not only_ckpt and not only_data:
        moved = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        parts.append(f"same names in another order ({', '.join(moved[:limit])})")
    return "; ".join(parts)
