"""cdnv2-train: a thin Hydra shim over :func:`cdnv2.engine.train`.

    cdnv2-train                                   # quickstart: cdnv2_tiny on shapes
    cdnv2-train model=cdnv2_b data=imagenet data.root=/data/imagenet
    cdnv2-train -m condense.lasso_lambda=0,1e-5 model=cdnv2_tiny,condensenet_86
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..engine import Callback, ModelConfig, TrainConfig, configure_runtime, train
from ..errors import ConfigError, TrainingInterrupted
from ..models import list_models
from .common import compose_config, make_main, run_user_command

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
    run_dir = HydraConfig.get().runtime.output_dir
    command_cfg: TrainCommandConfig = OmegaConf.to_object(cfg)

    def go():
        try:
            return run_command(command_cfg, run_dir)
        except TrainingInterrupted as e:
            print(f"{PROG}: {e}; re-run the same command to resume", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    report = run_user_command(PROG, go)
    compact = report.get("compact") or {}
    return compact.get("top1", report.get("top1"))  # the value sweepers optimise


main = make_main(PROG, "train", _run)


if __name__ == "__main__":
    main()
