"""A training run's state on disk: what its checkpoint holds, resuming it, or starting afresh.

A re-run of the same command resumes from ``checkpoints/last.pt`` (or ``prev.pt``) when
that checkpoint fits this run (model, classes, step count) and was written by a run with
the same settings (its identity, :func:`cdnv2.engine.run_dir.run_identity`). Otherwise it
refuses with what differs and never overwrites an earlier run's outputs. The rules for
the folder itself (lock, outputs, moving aside) are :mod:`cdnv2.engine.run_dir`'s.

:func:`checkpoint_state` writes a trainer's :class:`~cdnv2.engine.state.TrainState` with
the run's description (the keys and version are :mod:`cdnv2.checkpoint`'s ``TRAIN_*``);
:func:`restore` puts the state back after the checks above.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import checkpoint as ckpt
from ..compact import Structure
from ..data import Data
from ..errors import CheckpointError, RunDirError
from . import run_dir as rundir
from .config import TrainConfig, config_to_dict
from .finalize import has_report
from .logger import log

if TYPE_CHECKING:
    from .trainer import Trainer


def run_identity(cfg: TrainConfig, data: Data) -> dict:
    """The fingerprint a checkpoint records: the resolved config and the data's identity."""
    root = None if cfg.data.name == "shapes" else cfg.data.root  # generated: config keys say it all
    return rundir.run_identity(config_to_dict(cfg), rundir.data_identity(
        root, len(data.train_loader.dataset), len(data.val_loader.dataset), data.class_names,
    ))


def checkpoint_state(t: Trainer) -> dict:
    """Everything a resume needs, as a plain dict (``kind="train"``): the run's description
    and the trainer's :class:`~cdnv2.engine.state.TrainState`."""
    run = {
        "model_name": t.cfg.model.name,
        "model_kwargs": t.state.model.arch_kwargs(),
        "class_names": list(t.data.class_names),
        "preprocess": t.data.eval_preprocess,
        "data_name": t.cfg.data.name,
        "config": config_to_dict(t.cfg),
        "run_identity": t.identity,
        "total_steps": t.total_steps,
    }
    return ckpt.train_checkpoint(run, t.state.state_dict())


def checkpoint_to_resume(resume: str, ckpt_dir: Path) -> tuple[dict, Path] | None:
    """``resume``: never (None), auto (``last.pt``, else ``prev.pt``; None: neither is
    readable) or a path. Raises when the file is not a training checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        found = ckpt.find_resume_checkpoint(ckpt_dir)
        if found is None:
            return None
        state, path = found
    else:
        path = Path(resume)
        state = ckpt.load_checkpoint(path)
    if state.get("kind") != "train":
        raise CheckpointError(f"{path} is a {state.get('kind')} artifact, not a training checkpoint")
    return state, path


def check_compatible(state: dict, path: Path, *, model_name: str, arch_kwargs: dict,
                     class_names: list[str], total_steps: int) -> None:
    """The checkpoint's model, classes and step count are this run's."""
    diffs = []
    if state.get("model_name") != model_name:
        diffs.append(f"model {state.get('model_name')!r} vs {model_name!r}")
    ours = arch_kwargs
    theirs = state.get("model_kwargs") or {}
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            diffs.append(f"model.{key} {theirs.get(key)!r} vs {ours.get(key)!r}")
    theirs_cls, ours_cls = list(state.get("class_names", [])), list(class_names)
    if theirs_cls != ours_cls:
        differ = [f"{a!r}/{b!r}" for a, b in zip(theirs_cls, ours_cls) if a != b][:3]
        diffs.append(
            f"{len(theirs_cls)} classes vs {len(ours_cls)} in the data"
            + (f" (first differences: {', '.join(differ)})" if differ else "")
        )
    if state.get("total_steps") != total_steps:
        diffs.append(
            f"total steps {state.get('total_steps')} vs {total_steps} "
            "(trainer.epochs, data.batch_size or the dataset size changed)"
        )
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run: " + "; ".join(diffs[:8])
            + ". Resume with the settings it was trained with, pick another run directory "
            "(name=... or hydra.run.dir=...), or start afresh with resume=never."
        )


def check_identity(state: dict, path: Path, identity: dict, run_dir: Path) -> None:
    """The checkpoint was written by a run with these settings (resumable keys aside)."""
    stored = state.get("run_identity") or {"config": state.get("config") or {}, "data": None}
    stored = {"config": rundir.config_identity(stored["config"]), "data": stored.get("data")}
    diffs = rundir.identity_differences(stored, identity, config_to_dict(TrainConfig()))
    if diffs:
        raise RunDirError(
            f"{path} belongs to a run with other settings (step {state.get('step')} of "
            f"{state.get('total_steps')}): " + "; ".join(diffs) + ". Resuming would mix two runs. "
            "To keep it and train separately, add name=<new name> (a new run directory) or "
            "hydra.run.dir=...; to replace it, add resume=never (it is moved to "
            f"{run_dir}.old-N/, nothing is deleted); to continue it, use the settings it "
            "was started with. Settings that may change on resume: " + ", ".join(rundir.RESUMABLE_KEYS) + "."
        )


def check_target_folder(run: rundir.RunDir, run_dir: Path, ckpt_dir: Path, identity: dict,
                        total_steps: int) -> None:
    """``resume=PATH`` writes into ``run_dir`` (rank 0): a run already there must be this one.

    Its own checkpoint must have this identity and be unfinished; outputs without a
    readable checkpoint are refused and logs alone moved aside, as for a new run.
    """
    own = ckpt.find_resume_checkpoint(ckpt_dir)
    if own is None:
        start_afresh(run, run_dir, ckpt_dir, replace=False)
        return
    state, path = own
    check_identity(state, path, identity, run_dir)
    if state.get("step", 0) >= total_steps and has_report(run_dir):
        raise RunDirError(
            f"{run_dir} holds a finished run (report.json, {path} at step {state.get('step')}); resuming "
            "another checkpoint there would overwrite its outputs. Resume into a new run directory "
            "with name=<new name> or hydra.run.dir=..."
        )


def run_finished(state: dict, path: Path, run_dir: Path, total_steps: int) -> bool:
    """The run in ``run_dir`` is finished: nothing to train, its outputs stay as they are.

    report.json is written last, so it says so also when ``last.pt`` is unreadable and
    the checkpoint found is the older ``prev.pt``: training on from that would rotate the
    unreadable ``last.pt`` over the good ``prev.pt`` and rewrite the outputs.
    """
    if not has_report(run_dir):
        return False
    if state["step"] >= total_steps:
        return True
    if path == run_dir / "checkpoints" / "prev.pt" and (run_dir / "checkpoints" / "last.pt").exists():
        log.warning("%s is unreadable, but the run finished (report.json is written): its outputs "
                    "are kept as they are", path.with_name("last.pt"))
        return True
    return False


def keep_fallback(path: Path) -> None:
    """Resuming from ``prev.pt`` because ``last.pt`` is unreadable (rank 0): rename that file
    to ``last.pt.unreadable``, so the next save does not rotate it over the good ``prev.pt``."""
    last = path.with_name("last.pt")
    if path.name == "prev.pt" and last.exists():
        os.replace(last, last.with_name("last.pt.unreadable"))
        log.warning("kept the unreadable %s as last.pt.unreadable; %s stays the fallback", last, path)


def start_afresh(run: rundir.RunDir, run_dir: Path, ckpt_dir: Path, *, replace: bool) -> None:
    """Before a new run (rank 0): never overwrite an earlier one's outputs or mix its logs."""
    outputs, logs = run.outputs(), run.logs()
    if outputs and not replace:
        names = ", ".join(str(p.relative_to(run_dir)) for p in outputs[:8])
        raise RunDirError(
            f"{run_dir} holds outputs of an earlier run but no readable checkpoint to resume "
            f"from (checkpoints/last.pt and prev.pt are missing or unreadable): {names}"
            f"{' ...' if len(outputs) > 8 else ''}. Nothing was overwritten. To train elsewhere, add "
            "name=<new name> or hydra.run.dir=...; to start over here, add resume=never (the old "
            f"run is moved to {run_dir}.old-N/); or put a good checkpoint back as "
            "checkpoints/last.pt and re-run."
        )
    if outputs or logs:
        aside = run.move_aside()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        what = "resume=never" if replace else "no checkpoint to resume from"
        log.warning("%s: moved the earlier run in %s aside to %s (nothing deleted)", what, run_dir, aside)


def restore(t: Trainer, state: dict, path: Path) -> None:
    """Put a checkpoint's TrainState (weights, optimizer, counters, RNG states) into the trainer."""
    ckpt.check_resumable(state, str(path))
    t.state.load_state_dict(state, new_optimizer=t.new_optimizer)
    if t.state.structure is Structure.MASKED:
        t.condenser.verify(t.state.step)
    elif t.state.step < t.condenser.final_step:
        raise CheckpointError(f"{path}: compact layers before the last condensation step")
