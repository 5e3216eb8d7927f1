"""cdnv2-train: a thin Hydra shim over :func:`cdnv2.engine.train`.

    cdnv2-train                                   # quickstart: cdnv2_tiny on shapes
    cdnv2-train model=cdnv2_b data=imagenet data.root=/data/imagenet
    cdnv2-train -m condense.lasso_lambda=0,1e-5 model=cdnv2_tiny,condensenet_86
    cdnv2-train -m hydra/launcher=slurm hydra.launcher.partition=gpu model=cdnv2_a,cdnv2_b
    cdnv2-train -m hydra/sweeper=pareto experiment=quick

A multirun (-m) lands in sweeps/<sweep_name>/<job>/ (see cli/sweeps.py): re-running the
same command skips finished jobs and resumes the others; failing jobs are recorded.
"""
from __future__ import annotations

import sys

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..data import DataError
from ..engine import TrainConfig, train
from ..errors import TrainingInterrupted
from . import launchers, search  # noqa: F401  (register the slurm / pareto presets)
from .common import make_main, run_user_command
from .sweeps import compact_latency_ms, export_distributed_env, missing_extra, run_sweep_job, with_sweep_name

PROG = "cdnv2-train"
GROUPS = {"model", "data", "optim", "sched", "condense", "trainer", "recipe", "experiment"}

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _sweep_job(train_cfg, run_dir, list(hydra_cfg.overrides.task))

    def go():
        try:
            return train(train_cfg, run_dir)
        except TrainingInterrupted as e:
            print(f"{PROG}: {e}; re-run the same command to resume", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    return _objective(run_user_command(PROG, go, (DataError,)))


def _objective(report: dict | None) -> float | None:
    """The value single-objective sweepers optimise: compact top-1 (masked when none)."""
    if report is None:
        return None
    compact = report.get("compact") or {}
    return compact.get("top1", report.get("top1"))


def _sweep_job(train_cfg: TrainConfig, run_dir: str, overrides: list[str]) -> float | None:
    """One sweep point: a failure is recorded in its run dir and the sweep goes on."""
    export_distributed_env()  # one process per GPU under a cluster launcher
    device = train_cfg.trainer.device
    report = run_sweep_job(
        PROG, run_dir, overrides, lambda: train(train_cfg, run_dir),
        latency=lambda path: compact_latency_ms(path, device), extra_errors=(DataError,),
    )
    return _objective(report)


_hydra_main = make_main(PROG, TrainConfig, GROUPS, "train", _run)


def main() -> None:
    error = missing_extra(sys.argv[1:], PROG)
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    run_user_command(PROG, lambda: launchers.check_launcher_args(sys.argv[1:]))
    sys.argv[1:] = run_user_command(PROG, lambda: with_sweep_name(sys.argv[1:]))
    _hydra_main()


if __name__ == "__main__":
    main()
