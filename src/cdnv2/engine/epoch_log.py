"""``epochs.csv``: one wide row per epoch, the table people plot and compare runs with.

``metrics.csv`` is the long log (step, epoch, name, value) of everything; this file has
one row per evaluated epoch with fixed columns: epoch, optimizer step, lr, mean training
loss of the epoch's good steps, validation top-1/top-5/loss, mask density per layer kind
(``density_lgc``, ``density_sfr``, ...), seconds of the epoch, training images per second
and peak memory (CUDA: max allocated MiB on this rank; CPU: the process's peak resident
set). Rank 0 writes it; a resumed run appends (its first row then covers the part of the
epoch trained after the resume).
"""
from __future__ import annotations

import csv
import resource
import sys
import time
from pathlib import Path

import torch

COLUMNS = ("epoch", "step", "lr", "train_loss", "val_top1", "val_top5", "val_loss")
TAIL = ("epoch_seconds", "images_per_second", "peak_memory_mib")


class EpochLog:
    """Collects one epoch's numbers; :meth:`write` appends its row (rank 0 only)."""

    def __init__(self, run_dir: str | Path | None, density_kinds: list[str]):
        self.path = Path(run_dir) / "epochs.csv" if run_dir is not None else None
        self.kinds = sorted(density_kinds)
        self.start()

    @property
    def columns(self) -> list[str]:
        return [*COLUMNS, *(f"density_{k}" for k in self.kinds), *TAIL]

    def start(self) -> None:
        self.started = time.perf_counter()
        self.images = 0
        self.loss_sum = 0.0
        self.loss_steps = 0

    def add_images(self, n: int) -> None:
        self.images += n

    def add_window(self, loss: float | None, good: int) -> None:
        """Losses of the steps looked at since the previous look (see HealthWindow)."""
        if loss is not None and good:
            self.loss_sum += loss * good
            self.loss_steps += good

    def write(self, *, epoch: int, step: int, lr: float, val: dict, density: dict[str, float],
              device: torch.device) -> dict:
        seconds = time.perf_counter() - self.started
        row = {
            "epoch": epoch, "step": step, "lr": lr,
            "train_loss": self.loss_sum / self.loss_steps if self.loss_steps else float("nan"),
            "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
            **{f"density_{k}": density.get(k, float("nan")) for k in self.kinds},
            "epoch_seconds": seconds,
            "images_per_second": self.images / max(seconds, 1e-9),
            "peak_memory_mib": peak_memory_mib(device),
        }
        if self.path is not None:
            new = not self.path.exists()
            with open(self.path, "a", newline="") as f:
                out = csv.writer(f)
                if new:
                    out.writerow(self.columns)
                out.writerow([_fmt(row[c]) for c in self.columns])
        self.start()
        return row


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
