#!/usr/bin/env python
"""Training throughput on this machine: masked first half vs compact second half.

    python scripts/bench_train.py                      # cdnv2_a/b/c, batch 32, 224x224
    python scripts/bench_train.py --variants cdnv2_a --repeats 3 --quickstart

Prints a markdown table: images/s of one SGD step (forward, backward, update) for the
masked model (first half of training) and the compact-training model (second half,
after all masks are final), their ratio measured in the same run, and optionally the
wall time of the quickstart command.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cdnv2
from cdnv2.compact import to_compact_training


def step_time(model, optimizer, x, y, repeats: int) -> float:
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up (allocations, oneDNN primitive caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_variant(name: str, batch: int, size: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model = cdnv2.create_model(name).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    masked = step_time(model, opt, x, y, repeats)
    cdnv2.condense_fully(model)
    to_compact_training(model, opt)
    compact = step_time(model, opt, x, y, repeats)
    return {"model": name, "masked_ms": 1e3 * masked, "compact_ms": 1e3 * compact,
            "masked_ips": batch / masked, "compact_ips": batch / compact, "speedup": masked / compact}


def quickstart_seconds() -> float:
    exe = Path(sys.executable).parent / "cdnv2-train"
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        subprocess.run([str(exe), f"hydra.run.dir={d}", "trainer.progress=none"], check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["cdnv2_a", "cdnv2_b", "cdnv2_c"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quickstart", action="store_true", help="also time the whole quickstart run")
    args = p.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.size}x{args.size}, fp32, median of {args.repeats}\n")
    print("| model | masked step (ms) | compact step (ms) | masked img/s | compact img/s | compact / masked speed |")
    print("|---|---|---|---|---|---|")
    for name in args.variants:
        r = bench_variant(name, args.batch, args.size, args.repeats, args.device)
        print(f"| {r['model']} | {r['masked_ms']:.0f} | {r['compact_ms']:.0f} | {r['masked_ips']:.1f} | "
              f"{r['compact_ips']:.1f} | {r['speedup']:.2f}x |", flush=True)
    if args.quickstart:
        print(f"\nquickstart (`cdnv2-train`, cdnv2_tiny on shapes): {quickstart_seconds():.0f} s wall time")


if __name__ == "__main__":
    main()
