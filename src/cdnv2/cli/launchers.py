"""Cluster launcher presets: ``hydra/launcher=slurm`` and its local twin ``slurm_local``.

Both build on hydra-submitit-launcher (``pip install 'cdnv2[cluster]'``) and add what a
CondenseNetV2 sweep needs:

- typed keys ``gpus`` (one process per GPU, each sweep point one torchrun-style job),
  ``time`` (Slurm's ``[D-]HH:MM:SS`` or minutes), next to submitit's ``partition``,
  ``constraint``, ``nodes``, ``mem_gb`` ...;
- a job whose process dies (OOM killer, node failure) is recorded in its run dir and
  the sweep goes on, as for jobs that fail with an error;
- preemption and time-limit signals checkpoint and requeue (``cli/sweeps.py``): the
  requeued job resumes from its run dir.

Without the extra nothing is registered; ``cdnv2-train`` says which extra to install.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError

log = logging.getLogger(__name__)

_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+)(?::(\d+))?$")


def time_to_minutes(value: str) -> int:
    """Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    text = str(value).strip()
    m = _TIME.match(text)
    if not m:
        raise ConfigError(
            f"hydra.launcher.time={value!r}: not a Slurm time; use minutes (90), HH:MM:SS "
            "(24:00:00) or D-HH:MM:SS (2-00:00:00)"
        )
    days, a, b, c = (int(g) if g else 0 for g in m.groups())
    if m.group(1):  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (b, 0, 0) if m.group(2) is None else (a, b, c)
        total = days * 1440 + hours * 60 + minutes + seconds / 60
    elif m.group(4) is not None:  # HH:MM:SS
        total = a * 60 + b + c / 60
    elif m.group(2) is not None:  # MM:SS
        total = a + b / 60
    else:  # MM
        total = b
    minutes = int(-(-total // 1))  # round up: never ask for less than was written
    if minutes < 1:
        raise ConfigError(f"hydra.launcher.time={value!r}: must be at least one minute")
    return minutes


def job_resources(gpus: int, tasks_per_node: Optional[int], time: str) -> dict[str, Any]:
    """submitit parameters for one torchrun-style job: one process per GPU."""
    if gpus < 0 or (tasks_per_node is not None and tasks_per_node < 1):
        raise ConfigError(
            f"hydra.launcher.gpus={gpus}, tasks_per_node={tasks_per_node}: gpus must be >= 0 and "
            "tasks_per_node >= 1 (or null: one process per GPU)"
        )
    return {
        "gpus_per_node": gpus,
        "tasks_per_node": tasks_per_node or max(gpus, 1),
        "timeout_min": time_to_minutes(time),
    }


def check_launcher_args(argv: list[str]) -> None:
    """Reject a bad ``hydra.launcher.time`` before Hydra starts (it would only say 'instantiation failed')."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "hydra.launcher.time":
            time_to_minutes(value.strip("'\""))


def _record_death(run_dir: Path, error: BaseException) -> None:
    """A job whose process died wrote no end record: write it for the summary."""
    from .sweeps import one_line, read_record, write_record

    if not run_dir.is_dir():
        return
    record = read_record(run_dir) or {}
    if record.get("status") in (None, "running"):
        record.update(status="died", exit_code=None, reason=one_line(f"{type(error).__name__}: {error}"))
        write_record(run_dir, record)


class SweepPointLauncher:
    """Mixed into submitit's launchers (``hydra_plugins/cdnv2_plugins``): gpus/time become
    submitit resources, and a job whose process dies does not end the sweep."""

    _EXECUTOR: str
    params: dict
    config: Any

    def __init__(self, gpus: int = 1, time: str = "24:00:00", tasks_per_node: Optional[int] = None,
                 **params: Any) -> None:
        params.pop("timeout_min", None)
        params.pop("gpus_per_node", None)
        super().__init__(**params, **job_resources(gpus, tasks_per_node, time))  # type: ignore[call-arg]

    def _executor(self) -> Any:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        init = {f"{self._EXECUTOR}_{k}": params.pop(k) for k in _SUBMITIT_INIT_KEYS & params.keys()}
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from hydra.core.singleton import Singleton

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        nums = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        for num, overrides in zip(nums, job_overrides):
            log.info("\t#%d : %s", num, " ".join(overrides))
        state = Singleton.get_state()
        jobs = self._executor().map_array(
            self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(nums), nums,
            [f"job_id_for_{n}" for n in nums], [state] * len(nums),
        )
        subdirs = [sweep_dir / str(n) for n in nums]  # hydra.sweep.subdir is the job number
        return [_result(job, overrides, d) for job, overrides, d in zip(jobs, job_overrides, subdirs)]


_SUBMITIT_INIT_KEYS = {"max_num_timeout"}  # executor constructor arguments, not job parameters


def _result(job: Any, overrides: Sequence[str], run_dir: Path) -> Any:
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    try:
        return job.results()[0]  # rank 0's return
    except UncompletedJobError as e:
        log.error("job %s (%s) died: %s", job.job_id, " ".join(overrides), str(e).strip().splitlines()[0])
        _record_death(run_dir, e)
        ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
        ret.return_value = None  # recorded as died; the sweep goes on
        return ret


if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    _PLUGINS = "hydra_plugins.cdnv2_plugins.launchers"

    @dataclass
    class SlurmConf(SlurmQueueConf):
        """hydra/launcher=slurm: one torchrun-style Slurm job per sweep point."""

        _target_: str = f"{_PLUGINS}.CdnSlurmLauncher"
        gpus: int = 1  # GPUs per node; one training process each
        time: str = "24:00:00"  # Slurm time limit ([D-]HH:MM:SS or minutes)
        tasks_per_node: Optional[int] = None  # processes per node; null: one per GPU
        max_num_timeout: int = 20  # requeues after time limits before giving up
        signal_delay_s: int = 300  # time-limit signal this long before the kill: checkpoint

    @dataclass
    class SlurmLocalConf(LocalQueueConf):
        """hydra/launcher=slurm_local: the same jobs as processes on this machine."""

        _target_: str = f"{_PLUGINS}.CdnLocalLauncher"
        gpus: int = 0  # GPUs per job (0: CPU)
        time: str = "24:00:00"  # time limit per job
        tasks_per_node: Optional[int] = None  # processes per job; null: one per GPU

    ConfigStore.instance().store(group="hydra/launcher", name="cdnv2_slurm_schema", node=SlurmConf)
    ConfigStore.instance().store(group="hydra/launcher", name="cdnv2_slurm_local_schema", node=SlurmLocalConf)
