"""Run logs: TensorBoard events, metrics.jsonl / metrics.csv, progress display."""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("cdnv2")


class MetricLogger:
    """Writes every scalar to TensorBoard, a JSON-lines file and a long-format CSV.

    Only rank 0 writes; other ranks get a logger that drops everything.
    """

    def __init__(self, run_dir: str | Path | None):
        self.enabled = run_dir is not None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        new_csv = not (run_dir / "metrics.csv").exists()
        self.csv_file = open(run_dir / "metrics.csv", "a", newline="", buffering=1)
        self.csv = csv.writer(self.csv_file)
        if new_csv:
            self.csv.writerow(["step", "epoch", "name", "value"])

    def log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
            self.csv.writerow([step, f"{epoch:.4f}", name, f"{value:.6g}"])
        self.jsonl.write(json.dumps({"step": step, "epoch": round(epoch, 4), **metrics}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
            self.csv_file.close()


class Progress:
    """A tqdm bar on a terminal, periodic plain lines otherwise (or nothing)."""

    def __init__(self, total: int, desc: str, mode: str = "auto", every: int = 20, enabled: bool = True):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.desc, self.every = total, desc, max(1, every)
        self.n = 0
        self.postfix: dict = {}
        self.start = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif self.mode == "lines" and (self.n % self.every == 0 or self.n == self.total):
            fields = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            rate = self.n / max(1e-9, time.perf_counter() - self.start)
            print(f"{self.desc} {self.n}/{self.total} ({rate:.1f} it/s) {fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
