"""cdnv2-train: a thin Hydra shim over :func:`cdnv2.engine.train`.

    cdnv2-train                                   # quickstart: cdnv2_tiny on shapes
    cdnv2-train model=cdnv2_b data=imagenet data.root=/data/imagenet
    cdnv2-train -m condense.lasso_lambda=0,1e-5 model=cdnv2_tiny,condensenet_86
"""
from __future__ import annotations

import sys

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..data import DataError
from ..engine import TrainConfig, train
from ..errors import TrainingInterrupted
from .common import make_main, run_user_command

PROG = "cdnv2-train"
GROUPS = {"model", "data", "optim", "sched", "condense", "trainer", "recipe", "experiment"}

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _run(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)

    def go():
        try:
            return train(train_cfg, run_dir)
        except TrainingInterrupted as e:
            print(f"{PROG}: {e}; re-run the same command to resume", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    report = run_user_command(PROG, go, (DataError,))
    compact = report.get("compact") or {}
    return compact.get("top1", report.get("top1"))  # the value sweepers optimise


main = make_main(PROG, TrainConfig, GROUPS, "train", _run)


if __name__ == "__main__":
    main()
