"""Hydra callbacks: the sweep summary written at the end of ``cdnv2-train -m``."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

COLUMNS = ["job", "overrides", "top1", "compact_top1", "parity_max_abs_diff", "paper_mflops", "paper_mparams", "train_seconds"]


def collect_sweep(sweep_dir: Path) -> list[dict]:
    """One row per job folder of a sweep that wrote a report.json."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        report_path = job / "report.json"
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_path) if overrides_path.exists() else []
        row = {"job": job.name, "overrides": " ".join(overrides)}
        if report_path.exists():
            r = json.loads(report_path.read_text())
            c = r.get("compact") or {}
            row.update(
                top1=round(r["top1"], 2),
                compact_top1=round(c["top1"], 2) if c else "",
                parity_max_abs_diff=f"{c['parity_max_abs_diff']:.1e}" if c else "",
                paper_mflops=round(r["flops"]["paper"] / 1e6, 2),
                paper_mparams=round(r["params"]["paper"] / 1e6, 3),
                train_seconds=r["train_seconds"],
            )
        else:
            row["top1"] = "failed"
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        with open(sweep_dir / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        table = markdown(rows)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep_dir / 'summary.csv'}):\n{table}", flush=True)


class ValidateConfig(Callback):
    """Check every value of a single run's config before Hydra creates its run directory.

    ``on_run_start`` is the last point before Hydra makes the folder and writes
    ``.hydra/`` and the log file there, so a bad value leaves nothing behind. Sweeps
    are checked per job, by the trainer.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ..engine import TrainConfig
        from ..engine.validation import validate_config
        from ..errors import UserError
        from .common import exit_user_error

        try:
            # callbacks: cdnv2-train's own key (cli/train.py), not part of the run's TrainConfig
            user = OmegaConf.masked_copy(config, [k for k in config if k not in ("hydra", "callbacks")])
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), user))
            validate_config(cfg)
        except UserError as e:
            exit_user_error(self.prog, e)
        except OmegaConfBaseException as e:  # e.g. an override that interpolates a missing key
            exit_user_error(self.prog, f"{type(e).__name__}: {str(e).splitlines()[0]}; fix the override.")
