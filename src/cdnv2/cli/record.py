"""cdnv2-train's record of a run (``.hydra/``, ``train.log``), written once the run owns its folder.

Hydra writes ``.hydra/config.yaml`` and opens the job's log file in the run directory
before the task starts, that is before the trainer has checked the folder (whose files
it holds, its lock, the identity of the run already there). So a refused command would
rewrite a finished or running run's record. cdnv2-train turns both off
(``hydra.output_subdir: null``; the log file's handler is :class:`DeferredFileHandler`)
and :class:`RunRecord` writes them when training starts, after every check passed.
A command that fails before that leaves no trace in the folder, and a run folder this
command created is removed again (:func:`remove_if_unused`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..engine import Callback

_MAX_PENDING = 10_000  # log records kept before the file opens (start-up logs a few dozen)

# run directory -> the outermost folder this command created for it (see RunDirWritable)
_created: dict[Path, Path] = {}


class DeferredFileHandler(logging.FileHandler):
    """A log file that keeps its records in memory until :meth:`start` (console output is
    not delayed); until then nothing is created or written."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True,
                 errors: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self._pending: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending is None:
            super().emit(record)
        elif len(self._pending) < _MAX_PENDING:
            self._pending.append(record)

    def start(self) -> None:
        """Open the file and write the records kept so far."""
        pending, self._pending = self._pending or [], None
        for record in pending:
            super().emit(record)


def start_log_files() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DeferredFileHandler):
            handler.start()


class RunRecord(Callback):
    """Write Hydra's ``.hydra/`` record and open ``train.log`` when training starts.

    ``task_cfg`` is the composed task config, ``hydra_cfg`` Hydra's own (``{"hydra": ...}``),
    as Hydra would have written them (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``).
    """

    def __init__(self, task_cfg: DictConfig, hydra_cfg: DictConfig) -> None:
        self.task_cfg, self.hydra_cfg = task_cfg, hydra_cfg

    def on_fit_start(self, trainer) -> None:
        start_log_files()
        if not trainer.is_main:
            return
        folder = Path(trainer.run_dir) / ".hydra"
        folder.mkdir(exist_ok=True)
        for name, node in (("config.yaml", self.task_cfg), ("hydra.yaml", self.hydra_cfg),
                           ("overrides.yaml", self.hydra_cfg.hydra.overrides.task)):
            (folder / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def note_created(run_dir: str | Path) -> None:
    """Before the run directory is made: remember the outermost folder that will be new."""
    run_dir = Path(run_dir).absolute()
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    if missing:
        _created[run_dir] = missing[-1]


def remove_if_unused(run_dir: str | Path) -> None:
    """Remove the run directory (and the parents made for it) when this command created it
    and left it empty: a refused or failed start leaves nothing behind."""
    run_dir = Path(run_dir).absolute()
    top = _created.pop(run_dir, None)
    if top is None:
        return
    for folder in (run_dir, *run_dir.parents):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
        if folder == top:
            return
