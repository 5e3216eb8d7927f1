"""Sweeps that finish and resume: deterministic folders, per-job records, cluster signals.

A multirun (``cdnv2-train -m ...``) writes into ``sweeps/<sweep_name>/<job number>/``.
The sweep name is ``sweep_name`` when given, else derived from the command's overrides,
so re-running the same command lands in the same folders: finished jobs are skipped,
unfinished ones resume from their checkpoints (``resume=auto``). Each job leaves a
``job.json`` (status, exit code, one-line reason, compact latency) that the sweep
summary and the Pareto search read; a failing job is recorded and the sweep goes on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from ..errors import TrainingInterrupted, UserError

log = logging.getLogger("cdnv2")

JOB_RECORD = "job.json"
SWEEP_EXIT_CODE = 4  # the sweep ran to its end, but some jobs did not finish

# hydra option -> (module that provides it, the cdnv2 extra that installs it)
_EXTRAS = {
    "hydra/launcher": {
        "slurm": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
        "slurm_local": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
        "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
        "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
    },
    "hydra/sweeper": {
        "pareto": ("hydra_plugins.hydra_optuna_sweeper", "search"),
        "optuna": ("hydra_plugins.hydra_optuna_sweeper", "search"),
    },
}


def missing_extra(argv: list[str], prog: str) -> str | None:
    """The message for a launcher/sweeper option whose optional package is not installed."""
    for arg in argv:
        group, _, option = arg.lstrip("+").partition("=")
        module, extra = _EXTRAS.get(group, {}).get(option, (None, None))
        if module and importlib.util.find_spec(module) is None:
            return (
                f"{prog}: error: '{arg}' needs the optional package {module.split('.')[-1].replace('_', '-')}, "
                f"which is not installed; install it with: pip install 'cdnv2[{extra}]'"
            )
    return None


# ---------------------------------------------------------------- the sweep folder
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
_MAX_NAME = 80


def derive_sweep_name(argv: list[str]) -> str:
    """A readable, deterministic folder name from a multirun's command-line overrides.

    Sorted, so the order on the command line does not matter. Launcher settings are not
    part of it, so a sweep can resume on another launcher; a non-default sweeper is (a
    search and a grid over the same overrides are different sweeps).
    """
    task, sweeper = [], "basic"
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        if key == "hydra/sweeper":
            sweeper = value
        elif not key.lstrip("+~").startswith("hydra"):
            task.append(arg)
    raw = "_".join(([] if sweeper == "basic" else [sweeper]) + sorted(task)) or "default"
    name = _UNSAFE.sub("-", raw)
    if name != raw or len(name) > _MAX_NAME:  # keep distinct commands apart after cleaning
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME - 9]}-{digest}"
    return name


def with_sweep_name(argv: list[str]) -> list[str]:
    """A multirun's arguments with ``sweep_name`` set (derived unless given).

    Set as an override, the name reaches every job, also those a cluster launcher
    composes elsewhere; ``hydra.sweep.dir`` is ``sweeps/${sweep_name}``.
    """
    if not {"-m", "--multirun"} & set(argv):
        return argv
    for arg in argv:
        if arg.startswith(("sweep_name=", "hydra.sweep.dir=")):
            value = arg.partition("=")[2]
            if arg.startswith("sweep_name=") and ("/" in value or value in ("", ".", "..", "null")):
                raise UserError(f"sweep_name={value!r}: must be a plain folder name (no '/')")
            return argv
    return [*argv, f"sweep_name='{derive_sweep_name(argv)}'"]  # quoted: the name has = and ,


# ---------------------------------------------------------------- job records
def read_record(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / JOB_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(run_dir: Path, record: dict) -> None:
    tmp = run_dir / (JOB_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / JOB_RECORD)


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_main_rank() -> bool:
    from ..engine.distributed import distributed_env

    try:
        return distributed_env().is_main
    except UserError:  # the job fails on it (the trainer says why); its record is still written
        return True


def _finished_before(run_dir: Path, overrides: list[str]) -> dict | None:
    """The report of this very job when an earlier run of the sweep finished it."""
    record = read_record(run_dir)
    report = run_dir / "report.json"
    if not record or record.get("status") != "finished" or not report.exists():
        return None
    if sorted(record.get("overrides", [])) != sorted(overrides):
        return None  # another job used this folder: let the run's own identity check decide
    return json.loads(report.read_text())


def run_sweep_job(prog: str, run_dir: str | Path, overrides: list[str], go: Callable[[], dict],
                  latency: Callable[[Path], float | None], extra_errors: tuple = ()) -> dict | None:
    """Run one job of a sweep; record how it ended instead of ending the sweep.

    Returns the run's report (None when the job failed). User errors, bugs and
    non-finite losses are recorded (``job.json``: status, exit code, one-line reason)
    and the sweep goes on; Ctrl-C / SIGTERM stop the whole sweep (re-run to resume); a
    cluster's preemption signal checkpoints and hands over to submitit's requeue.
    """
    run_dir = Path(run_dir)
    done = _finished_before(run_dir, overrides)
    if done is not None:
        print(f"{prog}: {run_dir}: already finished; skipped", file=sys.stderr, flush=True)
        return done
    record: dict[str, Any] = {"overrides": list(overrides), "status": "running", "exit_code": None,
                              "reason": "", "compact_latency_ms": None}
    if _is_main_rank():
        write_record(run_dir, record)
    report = None
    with _Preemption() as preemption:
        try:
            report = go()
            if _is_main_rank():
                record["compact_latency_ms"] = latency(run_dir)
            record.update(status="finished", exit_code=0)
        except (UserError, *extra_errors) as e:
            record.update(status="failed", exit_code=getattr(e, "exit_code", 2), reason=one_line(e))
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        except TrainingInterrupted as e:
            record.update(status="interrupted", exit_code=e.exit_code, reason=one_line(e))
            if _is_main_rank():
                write_record(run_dir, record)
            if preemption.received:
                preemption.requeue()
            print(f"{prog}: {e}; re-run the same command to resume the sweep", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except Exception as e:  # a bug: show it, record it, keep sweeping
            traceback.print_exc()
            record.update(status="failed", exit_code=1, reason=one_line(f"{type(e).__name__}: {e}"))
    if _is_main_rank():
        write_record(run_dir, record)
    return report


# ---------------------------------------------------------------- cluster jobs
def _submitit_env() -> Any:
    """submitit's JobEnvironment when this process is a submitit job, else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or importlib.util.find_spec("submitit") is None:
        return None
    import submitit

    return submitit.JobEnvironment()


def export_distributed_env() -> None:
    """In a multi-task submitit job, give each task torchrun's variables (RANK, ...).

    The launcher starts one process per GPU (tasks_per_node); the engine reads the same
    variables as under torchrun, so a sweep point trains exactly as a torchrun job does.
    """
    from ..engine.distributed import RANK_VARS

    env = _submitit_env()
    if env is None or env.num_tasks <= 1 or any(v in os.environ for v in RANK_VARS):
        return  # set already: the trainer checks that the set is complete
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class _Preemption:
    """Under submitit, turn its preemption / time-limit signal into a clean stop.

    submitit's own handler requeues at once, mid-step, losing the work since the last
    checkpoint. While the trainer runs, the signal instead asks it to stop as on SIGTERM
    (finish the step, write last.pt); :meth:`requeue` then lets submitit's handler
    requeue the job, which resumes from its run dir. Outside training (set-up, final
    evaluation) submitit's handler runs directly: there is nothing to save.
    """

    def __init__(self) -> None:
        env = _submitit_env()
        self.signum = env._usr_sig() if env is not None else None
        self.received = False
        self._submitit_handler: Any = None
        self._sigterm_outside: Any = None

    def __enter__(self) -> "_Preemption":
        if self.signum is not None:
            self._submitit_handler = signal.signal(self.signum, self._on_signal)
            self._sigterm_outside = signal.getsignal(signal.SIGTERM)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self._submitit_handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) == self._sigterm_outside:  # the trainer is not running
            self._submitit_handler(signum, frame)
            return
        self.received = True
        log.warning("preemption / time-limit signal %d: checkpointing, then requeueing", signum)
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's own stop request

    def requeue(self) -> None:
        """Re-deliver the signal to submitit's handler: it requeues this job and exits."""
        if _is_main_rank():
            self._submitit_handler(self.signum, None)
        sys.exit(0)  # other ranks: rank 0's requeue restarts the whole job


def compact_latency_ms(run_dir: Path, device: str = "auto") -> float | None:
    """Batch-1 latency of the run's compact model (median, ms), the cost a search can minimise."""
    path = run_dir / "model_compact.pt"
    if not path.exists():
        return None
    import torch

    import cdnv2
    from ..benchmark import time_forward

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cdnv2.load_model(path, device=device)
    size = model.cdnv2_meta["preprocess"]["crop"]
    timing = time_forward(model, (3, size, size), batch=1, device=device, min_seconds=0.3, min_repeats=10)
    return round(timing.ms_per_batch, 3)
