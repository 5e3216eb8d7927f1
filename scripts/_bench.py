"""What the speed scripts share (bench_compile.py, bench_convert.py, bench_deploy.py): their
common arguments, the models they time, the round-robin timing loop and the load average
quoted with every table. Imported as ``_bench`` (the scripts run from scripts/)."""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

import cdnv2

# torchvision models of about the FLOPs of each variant, timed beside it
PEERS = {"cdnv2_a": "shufflenet_v2_x0_5", "cdnv2_b": "shufflenet_v2_x1_0", "cdnv2_c": "mobilenet_v2"}


def parser(doc: str, *, variants: list[str], variant_choices: list[str] | None = None,
           warmup: str | None = None,
           threads_help: str = "torch.set_num_threads (default: torch's)") -> argparse.ArgumentParser:
    """A parser with the arguments every speed script takes: --variants, --batch, --size,
    --repeats, --threads, and --warmup when ``warmup`` (its help) is given."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=variants, choices=variant_choices)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model (median reported)")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=2, help=warmup)
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    return p


def condensed(name: str) -> torch.nn.Module:
    """Variant ``name`` built with seed 0 and fully condensed, in eval mode."""
    torch.manual_seed(0)
    return cdnv2.condense_fully(cdnv2.create_model(name)).eval()


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, *,
                     rewarm: bool = True) -> dict[str, list[float]]:
    """ms per call of each function, measured in interleaved rounds.

    Interleaving spreads the load of other processes over all models alike; with
    ``rewarm`` each timed call follows an untimed one of the same model, so no model is
    timed with caches just flushed by another (a server runs one model warm).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if rewarm:
                fn()
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def load_average() -> float:
    """The 1-minute load average: quoted at the start and end of every table."""
    return os.getloadavg()[0]


def print_tables(lines: list[str]) -> None:
    """Print a script's header and tables, closed by the load average at the end."""
    print("\n".join([*lines, f"load average at end {load_average():.2f}"]))
