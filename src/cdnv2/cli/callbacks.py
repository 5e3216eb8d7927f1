"""Hydra callbacks: the sweep summary written at the end of ``cdnv2-train -m``."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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
