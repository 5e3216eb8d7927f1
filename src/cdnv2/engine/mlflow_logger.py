"""Optional MLflow tracking (``trainer.mlflow=true``; the ``mlflow`` extra).

Everything the run logs to TensorBoard and ``metrics.csv`` also goes to one MLflow run:
the flat config as parameters at the start, every scalar with its optimizer step, the
report's headline numbers at the end, and the run is marked finished. The store is
``<run dir>/mlflow.db`` (a local SQLite store, MLflow's maintained local backend; nothing
leaves the machine, artifacts would go to ``<run dir>/mlartifacts``) unless
``trainer.mlflow_uri`` names another tracking URI. A resumed run continues the MLflow run
it started (found by the ``cdnv2.run_dir`` tag) rather than opening a second one.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from .hparams import final_metrics, flat_params

EXPERIMENT = "cdnv2"
_RUN_DIR_TAG = "cdnv2.run_dir"


def check_mlflow(enabled: bool) -> None:
    if not enabled:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            "trainer.mlflow=true needs the mlflow package: pip install 'cdnv2[mlflow]', or set trainer.mlflow=false."
        ) from None


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).absolute() / 'mlflow.db'}"


class MlflowLogger:
    """Mirrors :class:`cdnv2.engine.logger.MetricLogger` into an MLflow run (rank 0 only)."""

    def __init__(self, run_dir: str | Path, config: dict, uri: str | None = None):
        check_mlflow(True)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            exp_id = experiment.experiment_id
        else:  # in the default store, artifacts stay in the run folder too (not ./mlruns)
            artifacts = None if uri else (Path(run_dir).absolute() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        key = str(Path(run_dir).absolute())
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{_RUN_DIR_TAG}` = '{key}' and attributes.status = 'RUNNING'",
            max_results=1,
        )
        if found:
            self.run_id = found[0].info.run_id
        else:
            run = self.client.create_run(exp_id, run_name=Path(run_dir).name, tags={_RUN_DIR_TAG: key})
            self.run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, report: dict, step: int) -> None:
        self.log(step, final_metrics(report))
        self.client.set_terminated(self.run_id, "FINISHED")


class WithMlflow:
    """The run's MetricLogger, every ``log`` also sent to MLflow."""

    def __init__(self, logger, mlflow: MlflowLogger):
        self.logger, self.mlflow = logger, mlflow

    def log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.logger.log(step, epoch, metrics)
        self.mlflow.log(step, metrics)

    def __getattr__(self, name):
        return getattr(self.logger, name)
