"""Forward-pass timing shared by cdnv2-eval (``cost=true``) and cdnv2-convert.

Latency is the median wall time of one forward pass (batch 1), throughput the images
per second of the median pass at a larger batch. Both run in eval mode under
``torch.no_grad()``, as evaluation does, on whatever device and thread count the
process has; :func:`device_note` states them, since a timing means nothing without.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .flops import count_cost


@dataclass
class Timing:
    batch: int
    ms_per_batch: float  # median of the timed passes
    repeats: int

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch / self.ms_per_batch if self.ms_per_batch > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "ms_per_batch": self.ms_per_batch,
            "images_per_second": self.images_per_second,
            "repeats": self.repeats,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int,
    device: torch.device | str = "cpu",
    *,
    warmup: int = 2,
    min_seconds: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 100,
) -> Timing:
    """Median time of a forward pass of ``batch`` random images of ``input_size``.

    Runs ``warmup`` untimed passes (allocator, oneDNN primitive caches, cached
    compact-layer plans), then timed passes until both ``min_seconds`` and
    ``min_repeats`` are reached.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0)).to(device, p.dtype)
    try:
        for _ in range(warmup):
            model(x)
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return Timing(batch=batch, ms_per_batch=1000.0 * statistics.median(times), repeats=len(times))


def device_note(device: torch.device | str) -> str:
    """'CPU, 2 threads' / 'cuda:0 (NVIDIA H100 ...)': where timings were taken."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"


def compare_costs(
    models: dict[str, nn.Module],
    input_size: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    batch: int = 32,
    min_seconds: float = 1.0,
) -> dict[str, dict]:
    """Paper-rule and executed cost, batch-1 latency and batch-``batch`` throughput per model."""
    device = torch.device(device)
    out = {}
    for name, model in models.items():
        model = model.to(device).eval()
        cost = count_cost(model, input_size)
        latency = time_forward(model, input_size, 1, device, min_seconds=min_seconds)
        throughput = time_forward(model, input_size, batch, device, min_seconds=min_seconds)
        out[name] = {
            **cost.as_dict(),
            "latency_ms_batch1": latency.ms_per_batch,
            "throughput_batch": batch,
            "throughput_images_per_second": throughput.images_per_second,
            "ms_per_batch": throughput.ms_per_batch,
        }
    return out


def cost_rows(costs: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of :func:`compare_costs` output (or of ``CostReport.as_dict()`` per
    model: no timing rows), one column per model."""
    names = list(costs)
    batch = next(iter(costs.values())).get("throughput_batch", 0) if costs else 0

    def row(label, fmt):
        return [label, *(fmt(costs[n]) for n in names)]

    rows = [
        row("paper-rule FLOPs (M)", lambda c: f"{c['paper_flops'] / 1e6:.2f}"),
        row("paper-rule params (M)", lambda c: f"{c['paper_params'] / 1e6:.3f}"),
        row("executed FLOPs (M)", lambda c: f"{c['exec_flops'] / 1e6:.2f}"),
        row("stored params (M)", lambda c: f"{c['params'] / 1e6:.3f}"),
    ]
    if all("latency_ms_batch1" in c for c in costs.values()):  # timed by compare_costs
        rows += [
            row("latency, batch 1 (ms)", lambda c: f"{c['latency_ms_batch1']:.2f}"),
            row(f"throughput, batch {batch} (img/s)", lambda c: f"{c['throughput_images_per_second']:.1f}"),
        ]
    return ["", *names], rows
