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

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..engine import Callback, ModelConfig, TrainConfig, configure_runtime, train
from ..errors import ConfigError, TrainingInterrupted
from ..models import list_models
from . import launchers, search  # noqa: F401  (register the slurm / pareto presets)
from .common import compose_config, make_main, run_user_command
from .record import RunRecord, remove_if_unused
from .sweeps import compact_latency_ms, export_distributed_env, missing_extra, run_sweep_job, with_sweep_name

PROG = "cdnv2-train"


@dataclass
class TrainCommandConfig(TrainConfig):
    """The run's config plus what only the command reads."""

    # name -> {_target_: import.path.of.a.Callback, its keyword arguments}
    callbacks: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """The schema, and one ``model=<name>`` option per registered model (from the registry)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainCommandConfig)
    for name in list_models():
        cs.store(group="model", name=name, node=ModelConfig(name=name))


register_configs()


def compose_train_config(overrides: list[str]) -> TrainCommandConfig:
    """What ``cdnv2-train <overrides>`` would run, composed in-process (tests, notebooks)."""
    return OmegaConf.to_object(compose_config("train", overrides))


def build_callbacks(specs: Dict[str, Any]) -> list[Callback]:
    """Instantiate the ``callbacks`` config key (Hydra's ``_target_`` convention)."""
    from hydra.utils import instantiate

    built = []
    for name, spec in specs.items():
        try:
            cb = instantiate(spec)
        except Exception as e:  # import error, bad arguments: the user's config
            raise ConfigError(f"callbacks.{name}: cannot build {spec}: {' '.join(str(e).split())[:400]}") from None
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks.{name}: {type(cb).__name__} is not a cdnv2.engine.Callback")
        built.append(cb)
    return built


def run_command(cfg: TrainCommandConfig, run_dir: str, callbacks: Iterable[Callback] = ()) -> dict:
    """Set the process up as the config says, then train (what the console command does).

    ``callbacks`` run after those the config names.
    """
    t = cfg.trainer
    configure_runtime(t.device, deterministic=t.deterministic, threads=t.threads, seed=cfg.seed, key="trainer.")
    callbacks = build_callbacks(cfg.callbacks) + list(callbacks)
    run_cfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)})
    return train(run_cfg, run_dir, callbacks)


def _run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    command_cfg: TrainCommandConfig = OmegaConf.to_object(cfg)
    # .hydra/ and train.log, once the run owns its folder (see cli/record.py)
    records = [RunRecord(cfg, copy.deepcopy(HydraConfig.instance().cfg))]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _sweep_job(command_cfg, run_dir, list(hydra_cfg.overrides.task), records)

    def go():
        try:
            return run_command(command_cfg, run_dir, records)
        except TrainingInterrupted as e:
            print(f"{PROG}: {e}; re-run the same command to resume", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        finally:
            remove_if_unused(run_dir)  # a refused or failed start leaves no empty folder

    return _objective(run_user_command(PROG, go))


def _objective(report: dict | None) -> float | None:
    """The value single-objective sweepers optimise: compact top-1 (masked when none)."""
    if report is None:
        return None
    compact = report.get("compact") or {}
    return compact.get("top1", report.get("top1"))


def _sweep_job(cfg: TrainCommandConfig, run_dir: str, overrides: list[str],
               callbacks: list[Callback]) -> float | None:
    """One sweep point: a failure is recorded in its run dir and the sweep goes on."""
    export_distributed_env()  # one process per GPU under a cluster launcher
    device = cfg.trainer.device
    report = run_sweep_job(
        PROG, run_dir, overrides, lambda: run_command(cfg, run_dir, callbacks),
        latency=lambda path: compact_latency_ms(path, device),
    )
    return _objective(report)


_hydra_main = make_main(PROG, "train", _run)


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
