"""One run per folder, identified by what it computes, and never overwritten.

- :class:`RunDir` owns a run directory for a process's lifetime: an OS lock (one
  process per folder; the OS drops it when the holder dies), clean-up of temporary
  files that a killed writer left behind (only safe under the lock), the list of
  outputs that must never be overwritten, and moving an old run aside.
- The lock file also marks the folder as a cdnv2 run. :func:`check_run_folder` refuses
  a folder that holds someone else's files (``hydra.run.dir=.`` in a project), and
  moving aside moves only what runs write (:func:`is_run_entry`), never other files.
  :func:`check_not_run_file` keeps other commands' ``out=`` off a run's own files.
- :func:`run_identity` is the fingerprint a checkpoint records: every resolved config
  value that changes results plus the data's identity. :func:`identity_differences`
  compares two of them, ignoring :data:`RESUMABLE_KEYS`.
"""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..atomic_files import TMP_MARK, remove_stale_temporaries
from ..errors import RunDirError

log = logging.getLogger("cdnv2")

# Config keys that may change when a run is resumed: where and how fast it runs, how
# much it logs and how it reacts to failures, never what it computes. Everything else
# in the resolved config is part of the run's identity. Documented in the README.
RESUMABLE_KEYS: tuple[str, ...] = (
    "trainer.device",
    "trainer.threads",
    "trainer.progress",
    "trainer.log_every",
    "trainer.checkpoint_minutes",
    "trainer.stage_snapshots",
    "trainer.channels_last",
    "trainer.compile",
    "trainer.deterministic",
    "trainer.nan_policy",
    "trainer.max_bad_steps",
    "trainer.parity_samples",
    "data.num_workers",
    "data.eval_batch_size",
    "data.on_corrupt",
    "data.download",
)
# Not results either: how the run was started and where it lives. data.root is
# replaced by the resolved folder in the data identity (a relative or symlinked path
# to the same folder is the same data).
_NOT_IDENTITY = ("resume", "name", "data.root")

LOCK_NAME = ".cdnv2-run.lock"  # also the mark of a cdnv2 run folder
# Files a run cannot recreate cheaply: overwriting them loses work.
_OUTPUT_GLOBS = ("checkpoints/*.pt", "model_compact*", "report.json")
# Logs of a run that wrote no checkpoint yet: kept (moved aside), never mixed.
_LOG_NAMES = ("metrics.jsonl", "metrics.csv", "epochs.csv", "tb", "mlflow.db", "mlartifacts")
# The current sweep job's record (cli/sweeps.py): it stays when an old run is moved aside.
_LAUNCHER_NAMES = ("job.json",)
# Everything cdnv2 writes at the top of a run folder: the run itself (its lock, the
# launcher's .hydra/ and train.log, a sweep's job.json) and the commands that write
# beside a run's files by default (eval.json, plots/, model_compact.* exports).
_RUN_ENTRIES = (
    LOCK_NAME, ".hydra", "train.log", "job.json", "job.json.tmp", "checkpoints", "metrics.jsonl",
    "metrics.csv", "epochs.csv", "mlflow.db", "mlartifacts", "tb", "report.json", "model_compact*", "eval.json", "plots", f".*{TMP_MARK}*",
    ".cdnv2-write-test-*",
)
# A run's own files (relative paths): only its cdnv2-train writes them.
_RUN_OWN_FILES = (
    "checkpoints", "checkpoints/last.pt", "checkpoints/prev.pt", "checkpoints/best.pt",
    "checkpoints/condense-step*.pt", "report.json", "model_compact.pt", "metrics.jsonl", "metrics.csv", "epochs.csv", "mlflow.db", "mlartifacts",
    "train.log", "job.json", LOCK_NAME, ".hydra", ".hydra/*", "tb", "tb/*",
)

_held: dict[Path, int] = {}  # run dirs this process holds (POSIX locks are per process)


# ----------------------------------------------------------------------------- identity
def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_identity(config: dict) -> dict[str, Any]:
    """The flattened config without the keys that may change on resume."""
    skip = set(RESUMABLE_KEYS) | set(_NOT_IDENTITY)
    return {k: v for k, v in _flatten(config).items() if k not in skip}


def data_identity(root: str | None, train_images: int, val_images: int, classes: list[str]) -> dict:
    """What the data is: resolved folder (None for generated data, whose parameters are
    config keys), split sizes and class list."""
    return {
        "root": str(Path(root).expanduser().resolve()) if root else None,
        "train_images": int(train_images),
        "val_images": int(val_images),
        "classes": list(classes),
    }


def run_identity(config: dict, data: dict) -> dict:
    return {"config": config_identity(config), "data": data}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def identity_differences(stored: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Human-readable differences "key: recorded -> now".

    A key the checkpoint does not record (written by an older version) counts as its
    default value in ``defaults`` (a flattened default config); keys this version no
    longer has are ignored.
    """
    diffs = []
    theirs, ours = stored.get("config", {}), current["config"]
    defaults = config_identity(defaults or {})
    for key in sorted(ours):
        old = theirs[key] if key in theirs else defaults.get(key, ours[key])
        if old != ours[key]:
            diffs.append(f"{key}: {_short(old)} -> {_short(ours[key])}")
    old_data, new_data = stored.get("data"), current["data"]
    if old_data:
        for key in ("root", "train_images", "val_images"):
            if old_data.get(key) != new_data[key]:
                diffs.append(f"data {key.replace('_', ' ')}: {_short(old_data.get(key))} -> {_short(new_data[key])}")
        a, b = list(old_data.get("classes", [])), new_data["classes"]
        if a != b:
            gone, new = [c for c in a if c not in b], [c for c in b if c not in a]
            detail = ", ".join(filter(None, [
                f"missing now {gone[:3]}" if gone else "", f"new {new[:3]}" if new else "",
                "same names, other order" if not gone and not new else "",
            ]))
            diffs.append(f"data classes: {len(a)} -> {len(b)} ({detail})")
    return diffs


# ----------------------------------------------------------------------------- the folder
def check_writable(folder: str | Path, what: str, hint: str) -> None:
    """Raise :class:`RunDirError` unless files can be created in ``folder`` (made if missing)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cdnv2-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"{what} {folder} is not writable ({e.strerror or e}); {hint}"
        ) from None


def is_run_entry(name: str) -> bool:
    """A name cdnv2 writes at the top of a run folder (see :data:`_RUN_ENTRIES`)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _RUN_ENTRIES)


def is_run_folder(folder: Path) -> bool:
    """``folder`` holds a cdnv2 run: its mark (the lock file), a report or a checkpoint."""
    return (folder / LOCK_NAME).exists() or (folder / "report.json").is_file() or (
        folder / "checkpoints" / "last.pt").is_file()


def check_run_folder(folder: str | Path) -> None:
    """Raise :class:`RunDirError` when ``folder`` holds files that no cdnv2 run wrote.

    A run owns its folder (it may move an earlier run aside), so it starts only in a
    new or empty folder, or one marked as a run. Files added to a marked run folder
    are left where they are.
    """
    folder = Path(folder)
    if not folder.is_dir() or (folder / LOCK_NAME).exists():
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not is_run_entry(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(
            f"{folder} is not a cdnv2 run directory: it holds files that no run wrote ({shown}). A run "
            "owns its folder (it writes, replaces and moves aside its files there), so it starts only in a "
            "new or empty folder: choose one with hydra.run.dir=... (or name=...). Nothing was written."
        )


def check_not_run_file(path: str | Path, option: str) -> None:
    """Raise :class:`RunDirError` when writing ``path`` would replace a run's own file."""
    target = Path(path).expanduser().resolve()
    for folder in target.parents:
        if not is_run_folder(folder):
            continue
        rel = target.relative_to(folder).as_posix()
        if any(fnmatch.fnmatchcase(rel, pattern) for pattern in _RUN_OWN_FILES):
            raise RunDirError(
                f"{option}={path} would replace {rel} of the cdnv2 run in {folder}; a run's own files "
                "(checkpoints/last.pt, prev.pt, best.pt, report.json, model_compact.pt, metrics.*, "
                f".hydra/, tb/) are written only by its cdnv2-train. Choose another path with {option}=..."
            )
        return


class RunDir:
    """A run directory held by this process: lock, stale temporaries, outputs, aside.

    Only the primary process (rank 0) locks and changes the folder; other ranks get an
    unlocked view. Use as a context manager or call :meth:`close`. Leaving the context
    with an error before :meth:`claim` (the run's checks failed, or its start-up did)
    removes what this object created (the lock file, an empty ``checkpoints/``), so a
    refused or failed start leaves the folder as it found it.
    """

    def __init__(self, path: str | Path, *, primary: bool = True):
        self.path = Path(path)
        self.primary = primary
        self.claimed = False
        self._fd: int | None = None
        self._created: list[Path] = []
        if primary:
            check_writable(self.path, "run directory", "choose a writable place with hydra.run.dir=... "
                           "(or name=...), or fix the folder's permissions")
            check_run_folder(self.path)
            self._created = [p for p in (self.path / LOCK_NAME, self.path / "checkpoints") if not p.exists()]
            self._lock()
            for stale in self._remove_stale_temporaries():
                log.warning("removed stale temporary checkpoint file %s", stale)

    # -- lock
    def _lock(self) -> None:
        key = self.path.resolve()
        if key in _held:
            raise RunDirError(
                f"run directory {self.path} is already in use by this process (pid {os.getpid()}); "
                "finish that run first or choose another folder (name=... or hydra.run.dir=...)"
            )
        # POSIX record locks (lockf), not flock: forked loader workers do not inherit
        # them, so the lock goes with the process that took it, dead or alive.
        while True:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                self._refuse(fd, e)
            # A failed start removes its lock file (see __exit__): a lock taken on a file
            # that was removed meanwhile locks nothing, so take the new one.
            if _same_file(fd, self.path / LOCK_NAME):
                break
            os.close(fd)
        info = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        _held[key] = fd

    def _refuse(self, fd: int, e: OSError) -> None:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise RunDirError(f"cannot lock run directory {self.path}: {e.strerror or e}") from None
        raise RunDirError(
            f"run directory {self.path} is in use by another process ({holder}). One run per "
            "folder: wait for that process to finish (or stop it: it resumes from its "
            "checkpoint), or start a separate run with name=... or hydra.run.dir=..."
        ) from None

    def close(self) -> None:
        if self._fd is not None:
            _held.pop(self.path.resolve(), None)
            os.close(self._fd)  # releases the lock; the file stays: it marks the folder as a run
            self._fd = None

    def __enter__(self) -> "RunDir":
        return self

    def claim(self) -> None:
        """The run's checks passed and it writes here: keep the folder on a later error."""
        self.claimed = True

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self.claimed and self._fd is not None:
            self._discard()
        self.close()

    def _discard(self) -> None:
        """Remove what this object created (under the lock, so no other run sees it go)."""
        for path in reversed(self._created):
            try:
                if path.is_dir():
                    path.rmdir()  # only when empty
                else:
                    path.unlink()
            except OSError:
                pass

    def _remove_stale_temporaries(self) -> list[Path]:
        # Under the lock no other writer exists, so every temporary file is a dead one's.
        return remove_stale_temporaries(self.path) + remove_stale_temporaries(self.path / "checkpoints")

    # -- what is there
    def outputs(self) -> list[Path]:
        """Existing files that a new run would overwrite."""
        return sorted(p for pattern in _OUTPUT_GLOBS for p in self.path.glob(pattern))

    def logs(self) -> list[Path]:
        return [self.path / n for n in _LOG_NAMES if (self.path / n).exists()]

    # -- moving an old run aside
    def move_aside(self) -> Path:
        """Move everything of the old run into ``<run>.old-N/`` (first free N).

        Only what runs write moves (:func:`is_run_entry`); other files, the lock and
        the current sweep job's record stay. Log files this process has open in the
        folder follow to fresh files at their old paths.
        """
        n = 1
        while True:
            aside = self.path.with_name(f"{self.path.name}.old-{n}")
            try:
                aside.mkdir()
                break
            except FileExistsError:
                n += 1
        keep = {LOCK_NAME, *_LAUNCHER_NAMES}
        left = []
        for entry in sorted(self.path.iterdir()):
            if entry.name in keep:
                continue
            if is_run_entry(entry.name):
                os.rename(entry, aside / entry.name)
            else:
                left.append(entry.name)
        if left:
            log.warning("left in %s what no run wrote: %s", self.path, ", ".join(left[:8]))
        _reopen_file_logs(self.path)
        return aside


def _reopen_file_logs(folder: Path) -> None:
    """Log files in ``folder`` that were moved away start afresh at their old paths."""
    folder = folder.resolve()
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
                stream = open(handler.baseFilename, handler.mode, encoding=handler.encoding, errors=handler.errors)
                old = handler.setStream(stream)  # flushes the old stream under the handler's lock
                if old is not None:
                    old.close()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
