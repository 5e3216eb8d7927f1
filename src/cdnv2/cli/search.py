"""``hydra/sweeper=pareto``: a multi-objective Optuna search over condensation settings.

Each trial is a training run; its objectives come from what the run reports: compact
top-1 (maximised) and a cost (minimised): the paper-rule FLOPs (``cost=flops``, exact)
or the measured batch-1 latency of the compact model (``cost=latency``, from the job's
``job.json``). At the end the sweep folder gets ``pareto.csv`` / ``pareto.md`` (the
non-dominated runs) and ``pareto.png`` (every finished run, the front highlighted).
Needs ``pip install 'cdnv2[search]'`` (hydra-optuna-sweeper, optuna<3).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from .hydra_callbacks import collect_sweep, write_table

log = logging.getLogger(__name__)

# cost name -> (summary column, axis label)
COSTS = {
    "flops": ("paper_mflops", "paper-rule MFLOPs"),
    "latency": ("compact_latency_ms", "compact latency, batch 1 (ms)"),
}
PARETO_COLUMNS = ["job", "compact_top1", "paper_mflops", "compact_latency_ms", "paper_mparams", "overrides"]


def check_cost(cost: str) -> str:
    if cost not in COSTS:
        raise ConfigError(f"hydra.sweeper.cost={cost!r}: must be one of {', '.join(COSTS)}")
    return cost


def objectives(run_dir: str | Path | None, cost: str) -> tuple[float, float] | None:
    """(compact top-1, cost) of a finished run; None when it did not finish."""
    if run_dir is None:
        return None
    from .hydra_callbacks import job_row

    row = job_row(Path(run_dir))
    value = row.get(COSTS[cost][0], "")
    if row["status"] != "finished" or row.get("compact_top1", "") == "" or value == "":
        return None
    return float(row["compact_top1"]), float(value)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (accuracy up, cost down), by increasing cost."""
    front = []
    for i, (acc, cost) in enumerate(points):
        dominated = any(
            a >= acc and c <= cost and (a > acc or c < cost) for j, (a, c) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], -points[i][0]))


def _varying_overrides(rows: list[dict]) -> None:
    """Keep only the overrides that differ between rows (the searched values)."""
    lists = [r["overrides"].split() for r in rows]
    common = set.intersection(*map(set, lists)) if lists else set()
    for r, items in zip(rows, lists):
        r["overrides"] = " ".join(o for o in items if o not in common)


def write_pareto(sweep_dir: Path, cost: str) -> list[dict]:
    """pareto.csv / .md / .png in the sweep folder; returns the front's rows."""
    column, label = COSTS[cost]
    rows = [r for r in collect_sweep(sweep_dir) if objectives(sweep_dir / r["job"], cost) is not None]
    if not rows:
        log.warning("no finished trial: no Pareto front written")
        return []
    _varying_overrides(rows)
    points = [(float(r["compact_top1"]), float(r[column])) for r in rows]
    front = [rows[i] for i in pareto_front(points)]
    table = write_table(front, PARETO_COLUMNS, sweep_dir / "pareto")
    _plot(points, pareto_front(points), label, sweep_dir / "pareto.png", [r["job"] for r in rows])
    print(f"\nPareto front, compact top-1 vs {label} ({sweep_dir / 'pareto.csv'}, pareto.png):\n{table}",
          flush=True)
    return front


def _plot(points: list[tuple[float, float]], front: list[int], label: str, path: Path, names: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # no pyplot: no global backend state
    ax = fig.add_subplot()
    ax.scatter([c for _, c in points], [a for a, _ in points], color="0.6", label="finished runs")
    fx, fy = [points[i][1] for i in front], [points[i][0] for i in front]
    ax.plot(fx, fy, "o-", color="C3", drawstyle="steps-post", label="Pareto front")
    for i in front:
        ax.annotate(f"job {names[i]}", (points[i][1], points[i][0]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("compact top-1 (%)")
    ax.set_title("accuracy vs cost of the condensed models")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)


class ObjectiveLauncher:
    """Wraps the real launcher: each job's return becomes (compact top-1, cost) from its run dir."""

    def __init__(self, launcher: Any, cost: str) -> None:
        self.launcher, self.cost = launcher, cost

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from hydra.core.utils import JobStatus

        returns = self.launcher.launch(job_overrides, initial_job_idx)
        for ret in returns:
            if ret.status == JobStatus.COMPLETED:
                run_dir = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg is not None else None
                ret.return_value = objectives(run_dir, self.cost)  # None: Optuna marks the trial failed
        return returns


class ParetoSearch:
    """Mixed into hydra-optuna-sweeper's OptunaSweeper (``hydra_plugins/cdnv2_plugins``)."""

    sweeper: Any  # the OptunaSweeperImpl that OptunaSweeper delegates to

    def __init__(self, cost: str = "flops", **kwargs: Any) -> None:
        self.cost = check_cost(cost)
        kwargs["direction"] = ["maximize", "minimize"]  # compact top-1 up, cost down
        super().__init__(**kwargs)  # type: ignore[call-arg]

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)  # type: ignore[misc]
        self.sweeper.launcher = ObjectiveLauncher(self.sweeper.launcher, self.cost)
        self._sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: list[str]) -> None:
        super().sweep(arguments)  # type: ignore[misc]
        write_pareto(self._sweep_dir, self.cost)


if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

    @dataclass
    class ParetoConf(OptunaSweeperConf):
        """hydra/sweeper=pareto: Optuna, two objectives, the front as a table and a plot."""

        _target_: str = "hydra_plugins.cdnv2_plugins.pareto_sweeper.ParetoSweeper"
        cost: str = "flops"  # flops (paper rule) | latency (measured compact batch-1 ms)
        direction: Any = field(default_factory=lambda: ["maximize", "minimize"])  # fixed: top-1, cost

    ConfigStore.instance().store(group="hydra/sweeper", name="cdnv2_pareto_schema", node=ParetoConf)

