"""Hydra callbacks: the sweep summary written at the end of ``cdnv2-train -m``."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .sweeps import JOB_RECORD, SWEEP_EXIT_CODE, read_record

COLUMNS = [
    "job", "status", "exit_code", "top1", "compact_top1", "paper_mflops", "paper_mparams",
    "compact_latency_ms", "parity_max_abs_diff", "train_seconds", "reason", "overrides",
]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / JOB_RECORD).exists())]
    return sorted(dirs, key=lambda p: (len(p.name), p.name))


def job_row(job: Path) -> dict:
    """One summary row: how the job ended (job.json) and what it measured (report.json)."""
    overrides_path = job / ".hydra" / "overrides.yaml"
    record = read_record(job) or {}
    overrides = OmegaConf.load(overrides_path) if overrides_path.exists() else record.get("overrides", [])
    report_path = job / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    status = record.get("status") or ("finished" if report else "died")
    if status == "running":  # the sweep is over: the process never wrote how it ended
        status = "died"
    row = {
        "job": job.name, "status": status, "exit_code": record.get("exit_code", 0 if report else ""),
        "reason": record.get("reason") or ("no exit recorded (killed?)" if status == "died" else ""),
        "overrides": " ".join(o for o in overrides if not o.startswith("sweep_name=")),
    }
    if report and status == "finished":
        c = report.get("compact") or {}
        latency = record.get("compact_latency_ms")
        row.update(
            top1=round(report["top1"], 2),
            compact_top1=round(c["top1"], 2) if c else "",
            paper_mflops=round(report["flops"]["paper"] / 1e6, 2),
            paper_mparams=round(report["params"]["paper"] / 1e6, 3),
            compact_latency_ms=latency if latency is not None else "",
            parity_max_abs_diff=f"{c['parity_max_abs_diff']:.1e}" if c else "",
            train_seconds=report["train_seconds"],
        )
    return row


def collect_sweep(sweep_dir: Path) -> list[dict]:
    """One row per job folder of a sweep, finished or not."""
    return [job_row(job) for job in _job_dirs(sweep_dir)]


def markdown(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table(rows: list[dict], columns: list[str], stem: Path) -> str:
    """``<stem>.csv`` and ``<stem>.md``; returns the Markdown table."""
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, columns)
    stem.with_suffix(".md").write_text(table + "\n")
    return table


class SweepSummary(Callback):
    """summary.csv / summary.md over every job; the exit code says whether all finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        table = write_table(rows, COLUMNS, sweep_dir / "summary")
        print(f"\nsweep summary ({sweep_dir / 'summary.csv'}):\n{table}", flush=True)
        unfinished = [r["job"] for r in rows if r["status"] != "finished"]
        if unfinished:
            print(
                f"cdnv2-train: {len(unfinished)} of {len(rows)} jobs did not finish (jobs "
                f"{', '.join(unfinished)}; see {sweep_dir / 'summary.md'}); re-run the same command "
                "to retry them (finished jobs are skipped)", file=sys.stderr, flush=True,
            )
            sys.exit(SWEEP_EXIT_CODE)


class ValidateConfig(Callback):
    """Check every value of a single run's config before Hydra creates its run directory.

    ``on_run_start`` is the last point before Hydra makes the folder, so a bad value
    leaves nothing behind (``.hydra/`` and the log file wait for the run's own checks:
    cli/record.py). Sweeps are checked per job, by the trainer.
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


class RunDirWritable(Callback):
    """A run directory that is read-only or holds someone else's files: one paragraph
    before Hydra makes or uses it. Notes a folder it makes, so that a failed start can
    remove it again (:func:`cdnv2.cli.record.remove_if_unused`)."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ..engine.run_dir import check_run_folder, check_writable
        from ..errors import UserError
        from .common import exit_user_error
        from .record import note_created

        run_dir = config.hydra.run.dir
        try:
            check_run_folder(run_dir)
            note_created(run_dir)
            check_writable(run_dir, "run directory", "choose a writable place with "
                           "hydra.run.dir=... (or name=...), or fix the folder's permissions")
        except UserError as e:
            exit_user_error(self.prog, e)
