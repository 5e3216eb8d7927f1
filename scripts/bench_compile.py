#!/usr/bin/env python
"""Speed of the compiled compact model: torch.compile (Inductor, CPU) of the compact
CondenseNetV2, of its masked form and of a torchvision peer of similar FLOPs.

Prints a markdown table of ms per batch (fp32, 224x224 by default) with the ratios
compact / peer and compact / masked from the same run, and the eager compact model
beside them. Models are timed round-robin (each timed call right after an untimed one of
the same model), median of --repeats. Every model is compiled the same way
(``torch.compile(model)`` under ``torch.no_grad()``, static shapes, Inductor's
``freezing`` on unless --no-freezing: weights become constants, convs get prepacked
weights); the compact model with ``fullgraph=True``.

    python scripts/bench_compile.py --variants cdnv2_a --batch 1 32 --repeats 3
    python scripts/bench_compile.py --variants cdnv2_b --batch 32 --profile   # top ops
    TORCH_LOGS=output_code python scripts/bench_compile.py ...               # Inductor's code

Compiling is slow on a loaded 2-core machine (minutes per model and batch size).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch
import torchvision

from cdnv2.compact import convert_model

from _bench import PEERS, condensed, load_average, parser, print_tables, time_round_robin


def parse_args(argv=None):
    p = parser(__doc__, variants=["cdnv2_a", "cdnv2_b", "cdnv2_c"], variant_choices=sorted(PEERS),
               warmup="untimed runs after compiling")
    p.add_argument("--no-masked", action="store_true", help="skip the masked model")
    p.add_argument("--no-freezing", action="store_true", help="compile without Inductor's freezing")
    p.add_argument("--profile", action="store_true", help="print the compiled compact model's top ops")
    return p.parse_args(argv)


def compiled(model: torch.nn.Module, x: torch.Tensor, fullgraph: bool = False):
    """The compiled model, compiled now (the first call) so that timing starts warm."""
    fn = torch.compile(model, fullgraph=fullgraph, dynamic=False)
    t0 = time.perf_counter()
    fn(x)
    print(f"  compiled {type(model).__name__} at batch {x.shape[0]} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return fn


def profile(fn, x: torch.Tensor, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            fn(x)
    print(f"\n{label}: top ops over 3 calls\n")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def rows_for(name: str, args) -> list[str]:
    masked = condensed(name)
    compact = convert_model(masked)  # parity checked on a small input
    peer = getattr(torchvision.models, PEERS[name])(weights=None).eval()
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size)
        torch._dynamo.reset()
        fns = {"compact": compiled(compact, x, fullgraph=True), "peer": compiled(peer, x)}
        if not args.no_masked:
            fns["masked"] = compiled(masked, x)
        ref = compact(x)
        err = float((fns["compact"](x) - ref).abs().max() / ref.abs().max())
        calls = {k: (lambda f=f: f(x)) for k, f in fns.items()}
        calls["eager compact"] = lambda: compact(x)
        t = time_round_robin(calls, args.repeats, args.warmup)
        med = {k: statistics.median(v) for k, v in t.items()}
        m = med.get("masked", float("nan"))
        rows.append(
            f"| {name} | {batch} | {med['compact']:.1f} ({min(t['compact']):.1f}) | {PEERS[name]} | "
            f"{med['peer']:.1f} ({min(t['peer']):.1f}) | {med['compact'] / med['peer']:.2f} | "
            f"{m:.1f} | {med['compact'] / m:.2f} | {med['eager compact']:.1f} | {err:.1e} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
        if args.profile:
            profile(fns["compact"], x, f"compiled compact {name}, batch {batch}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = not args.no_freezing
    out = [
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch.get_num_threads() = "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; fp32, "
        f"torch.compile (Inductor, freezing {'off' if args.no_freezing else 'on'}), {args.size}x{args.size}; "
        f"ms per batch, median (min) of {args.repeats} warm round-robin runs; load average at start {load_average():.2f}",
        "",
        "| model | batch | compiled compact ms | peer | compiled peer ms | compact / peer | compiled masked ms "
        "| compact / masked | eager compact ms | compiled vs eager max rel diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    with torch.no_grad():
        for name in args.variants:
            out += rows_for(name, args)
    out.append("")
    print_tables(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
