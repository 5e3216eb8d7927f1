"""A run's hyper-parameters and final numbers, flat, for experiment trackers.

TensorBoard's HParams tab (written at the end of a run into ``tb/``) and the MLflow
logger (:mod:`cdnv2.engine.mlflow_logger`) both take the config as flat ``section.key``
parameters and the report's headline numbers as final metrics: top-1 of the masked and
the compact model and the compact model's cost.
"""
from __future__ import annotations

from typing import Any


def flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}``; lists and None become strings (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def final_metrics(report: dict) -> dict[str, float]:
    """The report's headline numbers (compact ones when the model was converted)."""
    out = {"final/top1": report["top1"], "final/top5": report["top5"], "final/mflops_paper": report["flops"]["paper"] / 1e6,
           "final/params_m_paper": report["params"]["paper"] / 1e6}
    compact = report.get("compact")
    if compact:
        out.update({
            "final/compact_top1": compact["top1"], "final/compact_top5": compact["top5"],
            "final/compact_mflops": report["flops"]["compact_exec"] / 1e6,
            "final/compact_params_m": report["params"]["compact"] / 1e6,
        })
    return {k: float(v) for k, v in out.items()}


def log_tensorboard_hparams(tb, config: dict, report: dict) -> None:
    """One HParams entry in the run's own event folder (``tb``: a SummaryWriter)."""
    tb.add_hparams(flat_params(config), final_metrics(report), run_name=".")
