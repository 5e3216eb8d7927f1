"""Atomic file writes: what is on disk is always a whole file, the old one or the new one.

:func:`atomic_save` writes to a temporary file in the same folder (its name holds
:data:`TMP_MARK`), fsyncs it and renames it over the target, so a kill at any moment
leaves either the old or the new file, never a partial one. :func:`save_rotating` keeps
the previous ``last.pt`` as ``prev.pt``, so a resume can fall back one checkpoint when the
newest is unreadable. A writer killed mid-write leaves its temporary file behind;
:func:`remove_stale_temporaries` clears them under the run lock.

The checkpoint format itself (what the dicts hold) is :mod:`cdnv2.checkpoint`'s. Callers
look these functions up through the module (``atomic_files.atomic_save(...)``), so one
patch of the module attribute reaches every write.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

TMP_MARK = ".tmp-"  # in every temporary file's name: ".<name>.tmp-<pid>"


def atomic_save(obj: Any, path: str | Path, *, keep_previous_as: str | None = None) -> None:
    """Write ``obj`` to ``path`` atomically (temp file, fsync, rename).

    With ``keep_previous_as``, an existing ``path`` is renamed to that name beside it
    once the new file is complete, just before the new file takes its place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous_as and path.exists():
            os.replace(path, path.with_name(keep_previous_as))
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        why = _write_failure(e)
        if why is None:
            raise
        raise CheckpointError(
            f"could not write checkpoint {path}: {why}. The previous checkpoint in that folder is "
            "intact; free disk space, raise the file size limit (ulimit -f) or fix permissions, "
            "and re-run the same command to resume."
        ) from e


def _write_failure(e: BaseException) -> str | None:
    """Why writing failed when the file system refused it: an OSError, or torch's writer's
    ``RuntimeError`` ("[enforce fail at inline_container.cc...]"), which carries the
    OSError it hit as its context when it has one. None: not a write failure (a bug)."""
    seen, depth = e, 0
    while seen is not None and depth < 8:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    text = str(e)
    if isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|file write failed", text):
        first = (text.strip().splitlines() or [""])[0][:200]
        return f"the file could not be written completely ({first})"
    return None


def save_rotating(obj: Any, path: str | Path) -> None:
    """Save ``path`` keeping its previous version as ``prev.pt`` beside it."""
    atomic_save(obj, path, keep_previous_as="prev.pt")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files left by a writer that was killed.

    Only safe while holding the folder's run lock: another live writer's in-flight
    file looks the same.
    """
    removed = []
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
