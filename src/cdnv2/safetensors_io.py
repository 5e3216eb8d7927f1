"""The compact artifact as a ``.safetensors`` file: the format to share weights in.

A safetensors file is a JSON header and raw tensor bytes; reading it runs no pickle,
so a file from a stranger cannot execute code. It holds what a compact ``.pt`` artifact
holds (:func:`cdnv2.checkpoint.save_compact`):

- the tensors: the compact model's state dict, index buffers (the kept LGC inputs, the
  SFR targets) included, under their state-dict names;
- the string metadata, one entry per artifact field: ``format``, ``kind``, ``version``,
  ``model_name`` and ``structure`` as plain strings; ``model_kwargs``, ``class_names``,
  ``preprocess``, ``metrics``, ``data`` and ``seed`` as JSON strings.

:func:`read` gives back the same dict a ``.pt`` artifact loads to, so one validate /
build path serves both (``cdnv2.load_model(path)``, ``checkpoint=path`` in the commands).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

SUFFIX = ".safetensors"
PLAIN = ("format", "kind", "model_name", "structure")  # strings as they are
JSON = ("version", "model_kwargs", "class_names", "preprocess", "metrics", "data", "seed")  # JSON strings
INSTALL_HINT = "pip install safetensors"


def is_safetensors(path: str | Path) -> bool:
    return str(path).endswith(SUFFIX)


def _library():
    try:
        import safetensors.torch as st
    except ImportError:
        raise CheckpointError(f"reading or writing .safetensors files needs the safetensors package: {INSTALL_HINT}") from None
    return st


def metadata_of(obj: dict) -> dict[str, str]:
    """The artifact fields of ``obj`` (a compact checkpoint dict) as safetensors metadata."""
    meta = {k: str(obj[k]) for k in PLAIN if obj.get(k) is not None}
    for k in JSON:
        if k in obj:
            meta[k] = json.dumps(obj[k])
    return meta


def write(obj: dict, path: str | Path) -> Path:
    """Write the compact checkpoint dict ``obj`` to ``path`` (a ``.safetensors`` file),
    through a temporary file renamed over ``path`` (never a partial file)."""
    st = _library()
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in obj["model_state"].items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        st.save_file(state, str(tmp), metadata=metadata_of(obj))
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; free disk space or choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """The checkpoint dict of a ``.safetensors`` artifact (tensors on the CPU), no pickle."""
    _library()
    from safetensors import safe_open

    where = where or str(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated header, bytes that are not safetensors ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{where}: cannot be read as safetensors ({type(e).__name__}: {first}); it is truncated, "
            "corrupted or not a safetensors file"
        ) from None
    obj: dict[str, Any] = {k: meta[k] for k in PLAIN if k in meta}
    for k in JSON:
        if k in meta:
            try:
                obj[k] = json.loads(meta[k])
            except json.JSONDecodeError:
                raise CheckpointError(f"{where}: metadata entry {k!r} is not valid JSON: {meta[k][:100]!r}") from None
    if "format" not in obj:
        raise CheckpointError(
            f"{where} is a safetensors file without cdnv2 metadata (no 'format' entry; it has "
            f"{', '.join(sorted(meta)) or 'no metadata'}); write one with cdnv2.save_compact(..., "
            "format='safetensors') or cdnv2-convert export=safetensors"
        )
    obj["model_state"] = state
    return obj
