#!/usr/bin/env python
"""Speed of the compiled compact model: torch.compile (Inductor, CPU) of the compact
CondenseNetV2 (its static forward), of its masked form, of its deployment graph
(``cdnv2.deploy.graph``, ONNX Runtime forms) and of a torchvision peer of similar FLOPs.

Prints a markdown table of ms per batch (fp32, 224x224 by default) with the ratios
compact / peer and compact / masked from the same run, and the eager compact model
beside them. Models are timed round-robin (each timed call right after an untimed one of
the same model), median of --repeats. Every model is compiled the same way
(``torch.compile(model)`` under ``torch.no_grad()``, static shapes, Inductor's
``freezing`` on unless --no-freezing: weights become constants, convs get prepacked
weights); the compact model with ``fullgraph=True``. By default glibc malloc is told to
keep freed memory (``--allocator keep``): with its defaults every activation above the
mmap threshold is a fresh mapping, page-faulted on every call (docs/deploy.md).

    python scripts/bench_compile.py --variants cdnv2_a --batch 1 32 --repeats 3
    python scripts/bench_compile.py --variants cdnv2_b --batch 32 --profile   # top ops
    python scripts/bench_compile.py --variants cdnv2_a --batch 32 1 --int8 --no-masked --no-graph

``--int8`` adds the PT2E int8 models (torchao's ``X86InductorQuantizer``, static per-tensor
activations, per-channel weights, calibrated on 4 random batches: a speed check only)
of the compact static forward, the deployment graph and the peer, compiled the same way,
in a second table with their max rel diff from fp32 and top-1 agreement on the timed batch.
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
from cdnv2.deploy.graph import build_deploy_model

from _bench import PEERS, condensed, load_average, parser, print_tables, time_round_robin


def parse_args(argv=None):
    p = parser(__doc__, variants=["cdnv2_a", "cdnv2_b", "cdnv2_c"], variant_choices=sorted(PEERS),
               warmup="untimed runs after compiling")
    p.add_argument("--no-masked", action="store_true", help="skip the masked model")
    p.add_argument("--no-freezing", action="store_true", help="compile without Inductor's freezing")
    p.add_argument("--profile", action="store_true", help="print the compiled compact model's top ops")
    p.add_argument("--allocator", choices=("keep", "glibc"), default="keep",
                   help="keep: glibc malloc keeps freed memory for reuse (no mmap per large tensor, see "
                        "docs/deploy.md); glibc: its defaults (each large tensor a fresh mmap, page-faulted)")
    p.add_argument("--no-graph", action="store_true", help="skip the compiled deployment graph (cdnv2.deploy.graph)")
    p.add_argument("--int8", action="store_true",
                   help="also PT2E int8 (X86InductorQuantizer) of the compact forward, the deployment graph and the peer")
    return p.parse_args(argv)


def keep_freed_memory() -> None:
    """glibc malloc: no mmap per large block and no trimming, so a freed activation is reused
    by the next call instead of being returned to the OS and page-faulted in again (what
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` set at process start; docs/deploy.md)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_top_pad, 256 << 20)
    if not ok:
        raise SystemExit("mallopt failed: not glibc? run with --allocator glibc")


def compiled(model: torch.nn.Module, x: torch.Tensor, fullgraph: bool = False):
    """The compiled model, compiled now (the first call) so that timing starts warm."""
    fn = torch.compile(model, fullgraph=fullgraph, dynamic=False)
    t0 = time.perf_counter()
    fn(x)
    print(f"  compiled {type(model).__name__} at batch {x.shape[0]} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return fn


def pt2e_int8(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``model`` quantized by PT2E for Inductor on x86 (torchao), calibrated on random images."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model.eval(), (x,)).module(), quantizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        prepared(torch.randn(x.shape, generator=gen))
    return convert_pt2e(prepared)


def int8_rows(name: str, batch: int, x: torch.Tensor, fp32: dict, args) -> list[str]:
    """One row per model: fp32 and int8 compiled, timed round-robin in one run."""
    fns, cells = {}, {}
    for label, model in fp32.items():
        fns[f"{label} fp32"] = compiled(model, x, fullgraph=label == "compact")
        fns[f"{label} int8"] = compiled(pt2e_int8(model, x), x)
        ref, out = model(x), fns[f"{label} int8"](x)
        cells[label] = (float((out - ref).abs().max() / ref.abs().max()),
                        float((out.argmax(1) == ref.argmax(1)).float().mean()))
    t = time_round_robin({k: (lambda f=f: f(x)) for k, f in fns.items()}, args.repeats, args.warmup)
    med = {k: statistics.median(v) for k, v in t.items()}
    return [f"| {name} | {batch} | {label} | {med[label + ' fp32']:.1f} | {med[label + ' int8']:.1f} | "
            f"{med[label + ' fp32'] / med[label + ' int8']:.2f} | {err:.1e} | {agree:.2f} |"
            for label, (err, agree) in cells.items()]


def profile(fn, x: torch.Tensor, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            fn(x)
    print(f"\n{label}: top ops over 3 calls\n")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def rows_for(name: str, args) -> tuple[list[str], list[str]]:
    masked = condensed(name)
    compact = convert_model(masked)  # parity checked on a small input
    peer = getattr(torchvision.models, PEERS[name])(weights=None).eval()
    graph = build_deploy_model(compact, "onnxruntime", input_size=(3, args.size, args.size)).eval()
    rows, int8 = [], []
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size)
        torch._dynamo.reset()
        fns = {"compact": compiled(compact, x, fullgraph=True), "peer": compiled(peer, x)}
        if not args.no_masked:
            fns["masked"] = compiled(masked, x)
        if not args.no_graph:
            fns["graph"] = compiled(graph, x)
        ref = compact(x)
        err = float((fns["compact"](x) - ref).abs().max() / ref.abs().max())
        calls = {k: (lambda f=f: f(x)) for k, f in fns.items()}
        calls["eager compact"] = lambda: compact(x)
        t = time_round_robin(calls, args.repeats, args.warmup)
        med = {k: statistics.median(v) for k, v in t.items()}
        m = med.get("masked", float("nan"))
        gr = med.get("graph", float("nan"))
        rows.append(
            f"| {name} | {batch} | {med['compact']:.1f} ({min(t['compact']):.1f}) | {PEERS[name]} | "
            f"{med['peer']:.1f} ({min(t['peer']):.1f}) | {med['compact'] / med['peer']:.2f} | "
            f"{m:.1f} | {med['compact'] / m:.2f} | {gr:.1f} | {med['compact'] / gr:.2f} | "
            f"{med['eager compact']:.1f} | {err:.1e} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
        if args.profile:
            profile(fns["compact"], x, f"compiled compact {name}, batch {batch}")
        if args.int8:
            torch._dynamo.reset()
            int8 += int8_rows(name, batch, x, {"compact": compact, "graph": graph, PEERS[name]: peer}, args)
            print("\n".join(int8[-3:]), file=sys.stderr, flush=True)
    return rows, int8


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = not args.no_freezing
    if args.allocator == "keep":
        keep_freed_memory()
    out = [
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch.get_num_threads() = "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; fp32, "
        f"torch.compile (Inductor, freezing {'off' if args.no_freezing else 'on'}), {args.size}x{args.size}, "
        f"allocator {args.allocator}; "
        f"ms per batch, median (min) of {args.repeats} warm round-robin runs; load average at start {load_average():.2f}",
        "",
        "| model | batch | compiled compact ms | peer | compiled peer ms | compact / peer | compiled masked ms "
        "| compact / masked | compiled deployment graph ms | compact / graph | eager compact ms "
        "| compiled vs eager max rel diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    int8 = []
    with torch.no_grad():
        for name in args.variants:
            rows, more = rows_for(name, args)
            out += rows
            int8 += more
    out.append("")
    if int8:
        out += ["PT2E int8 (X86InductorQuantizer, random calibration), compiled the same way as fp32:", "",
                "| model | batch | module | fp32 ms | int8 ms | int8 speed-up | int8 vs fp32 max rel diff "
                "| top-1 agreement |",
                "|---|---:|---|---:|---:|---:|---:|---:|", *int8, ""]
    print_tables(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
