#!/usr/bin/env python
"""Training throughput on this machine: masked first half vs compact second half.

    python scripts/bench_train.py                      # cdnv2_a/b/c, batch 32, 224x224
    python scripts/bench_train.py --variants cdnv2_a --repeats 3 --quickstart
    python scripts/bench_train.py --loop --variants cdnv2_b --batch 8 --size 64 --threads 1  # trainer's step

Prints a markdown table: images/s of one SGD step (forward, backward, update) for the
masked model (first half of training) and the compact-training model (second half,
after all masks are final), their ratio measured in the same run, and optionally the
wall time of the quickstart command. ``--loop`` times the trainer's own step instead
(``Trainer.train_step`` + ``after_step``: loss checks, EMA, condensation schedule) on
generated shapes data, with and without EMA, and one EMA update alone.
"""
from __future__ import annotations

import argparse
import itertools
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loop_step_ms(name: str, batch: int, size: int, repeats: int, device: str, ema: bool) -> float:
    """Mean ms of ``Trainer.train_step`` + ``after_step`` over ``repeats`` steps after one warm-up."""
    from cdnv2.data import DataConfig
    from cdnv2.engine import TrainConfig, Trainer, TrainerConfig

    cfg = TrainConfig(data=DataConfig(num_train=batch * (repeats + 2), num_val=batch, batch_size=batch,
                                      image_size=size))
    cfg.model.name = name
    cfg.trainer = TrainerConfig(epochs=1, device=device, progress="none", ema_decay=0.9998 if ema else None)
    cfg.resume = "never"
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, d)
        trainer.model.train()
        batches = list(itertools.islice(trainer.data.train_loader, repeats + 1))
        trainer.train_step(*batches[0])
        trainer.after_step()
        _sync(device)
        t = time.perf_counter()
        for images, targets in batches[1:]:
            trainer.train_step(images, targets)
            trainer.after_step()
        _sync(device)
        return 1e3 * (time.perf_counter() - t) / repeats


def ema_update_ms(name: str, repeats: int, device: str, gated: bool = False) -> float | None:
    """Median ms of one ``ModelEMA.update``; ``gated``: the trainer's form (a device flag)."""
    import inspect

    from cdnv2.condense import ModelEMA

    model = cdnv2.create_model(name).to(device)
    ema = ModelEMA(model, 0.9998)
    if gated and "apply" not in inspect.signature(ema.update).parameters:
        return None  # older code: no gated form
    kwargs = {"apply": torch.ones((), device=device)} if gated else {}
    ema.update(model, **kwargs)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        ema.update(model, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def loop_table(args) -> None:
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.size}x{args.size} shapes data, fp32, mean of {args.repeats} steps\n")
    print("| model | trainer step (ms) | with EMA (ms) | EMA update (ms) | gated EMA update (ms) |")
    print("|---|---|---|---|---|")
    for name in args.variants:
        plain = loop_step_ms(name, args.batch, args.size, args.repeats, args.device, ema=False)
        with_ema = loop_step_ms(name, args.batch, args.size, args.repeats, args.device, ema=True)
        ema = ema_update_ms(name, max(20, args.repeats), args.device)
        gated = ema_update_ms(name, max(20, args.repeats), args.device, gated=True)
        gated_text = f"{gated:.2f}" if gated is not None else "-"
        print(f"| {name} | {plain:.1f} | {with_ema:.1f} | {ema:.2f} | {gated_text} |", flush=True)


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
    p.add_argument("--loop", action="store_true", help="time the trainer's own step (EMA, checks) instead")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loop:
        loop_table(args)
        return
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
