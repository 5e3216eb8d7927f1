"""Crash-safe checkpoint files.

A checkpoint is a plain dict of tensors and primitives (``torch.load(weights_only=True)``
reads it). Writes go to a temporary file in the same folder, are fsync'ed and then
renamed over the target, so a kill at any moment leaves either the old or the new
file, never a partial one. ``last.pt`` is rotated to ``prev.pt`` first, so a resume
can fall back one checkpoint when the newest is unreadable.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "cdnv2"
TMP_MARK = ".tmp-"


_writes: dict[str, int] = {}


def _crash_hook(path: Path, f) -> None:
    # Test hook CDNV2_TEST_KILL_DURING_SAVE=<name>@<n>: SIGKILL this process half-way
    # through its n-th write of checkpoint <name>, leaving a partial temporary file.
    spec = os.environ.get("CDNV2_TEST_KILL_DURING_SAVE")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if path.name != name:
        return
    _writes[name] = _writes.get(name, 0) + 1
    if _writes[name] == int(nth or 1):
        f.flush()
        f.truncate(max(1, f.tell() // 2))
        os.kill(os.getpid(), 9)


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
            _crash_hook(path, f)
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
        if isinstance(e, OSError):
            raise CheckpointError(
                f"could not write checkpoint {path}: {e.strerror or e}. The previous checkpoint "
                "in that folder is intact; free disk space (or fix permissions) and re-run the "
                "same command to resume."
            ) from e
        raise


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


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load and sanity-check a cdnv2 checkpoint; raise :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never written completely")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, random bytes ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is truncated, corrupted or not a cdnv2 checkpoint"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a cdnv2 checkpoint (found {keys}); official CondenseNetV2 release "
            "files are read with `official=<variant>` in cdnv2-eval / cdnv2-convert"
        )
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
