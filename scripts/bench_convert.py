#!/usr/bin/env python
"""Speed of masked vs compact CondenseNetV2 on the CPU, next to torchvision peers.

Prints a markdown table: ms per batch (224x224, fp32, eager) for the masked model, the
compact model and a torchvision peer of similar FLOPs, with the ratios from the same
run; the compact artifact's size against its parameter bytes; and one training step of
cdnv2_b (batch 32) with masked vs compact-training layers.

Models are timed round-robin (masked, compact, peer, masked, ...) so that load from
other processes hits all of them alike, each timed call right after an untimed call of
the same model (warm caches, as in a server); each number is the median of --repeats.

    python scripts/bench_convert.py                       # the full table (minutes)
    python scripts/bench_convert.py --variants cdnv2_a --batch 1 --repeats 3 --no-train
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

from cdnv2.checkpoint import save_compact
from cdnv2.compact import convert_model, release_workspace, to_compact_training

from _bench import PEERS, condensed, load_average, parser, print_tables, time_round_robin


def parse_args(argv=None):
    p = parser(__doc__, variants=["cdnv2_a", "cdnv2_b", "cdnv2_c"], warmup="untimed runs first")
    p.add_argument("--no-peers", action="store_true", help="skip the torchvision models")
    p.add_argument("--no-infer", action="store_true", help="skip the inference and artifact tables")
    p.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    p.add_argument("--train-variant", default="cdnv2_b")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-repeats", type=int, default=5)
    return p.parse_args(argv)



def fmt(ms: list[float]) -> str:
    return f"{statistics.median(ms):.1f}"


def inference_rows(args) -> list[str]:
    rows = [
        "| model | batch | masked ms | compact ms | speedup (masked / compact) | peer | peer ms | compact / peer |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name in args.variants:
        masked = condensed(name)
        compact = convert_model(masked)  # parity checked on a small input
        peer_name = None if args.no_peers else PEERS.get(name)
        peer = getattr(torchvision.models, peer_name)(weights=None).eval() if peer_name else None
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            fns = {"masked": lambda: masked(x), "compact": lambda: compact(x)}
            if peer is not None:
                fns["peer"] = lambda: peer(x)
            with torch.no_grad():
                t = time_round_robin(fns, args.repeats, args.warmup)
            m, c = statistics.median(t["masked"]), statistics.median(t["compact"])
            p = statistics.median(t["peer"]) if peer is not None else float("nan")
            peer_cell = f"{p:.1f} ({min(t['peer']):.1f})" if peer is not None else "-"
            rows.append(
                f"| {name} | {batch} | {m:.1f} ({min(t['masked']):.1f}) | {c:.1f} ({min(t['compact']):.1f}) | "
                f"{m / c:.2f}x | {peer_name or '-'} | {peer_cell} | {c / p:.2f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def artifact_rows(args) -> list[str]:
    rows = ["| model | artifact bytes | parameter bytes | ratio |", "|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            compact = convert_model(condensed(name), check=False)
            path = save_compact(Path(tmp) / f"{name}.pt", compact, model_name=name, model_kwargs={})
            size = path.stat().st_size
            params = sum(p.numel() * p.element_size() for p in compact.parameters())
            rows.append(f"| {name} | {size:,} | {params:,} | {size / params:.3f} |")
    return rows


def train_rows(args) -> list[str]:
    release_workspace()  # start from the same memory state as a training process
    masked = condensed(args.train_variant).train()
    compact = copy.deepcopy(masked)
    opt_m = torch.optim.SGD(masked.parameters(), lr=0.01, momentum=0.9)
    opt_c = torch.optim.SGD(compact.parameters(), lr=0.01, momentum=0.9)
    to_compact_training(compact, opt_c)
    x = torch.randn(args.train_batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.train_batch,))

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    t = time_round_robin({"masked": lambda: step(masked, opt_m), "compact": lambda: step(compact, opt_c)},
                         args.train_repeats, 1, rewarm=False)
    m, c = statistics.median(t["masked"]), statistics.median(t["compact"])
    return [
        "| model | batch | masked train step ms | compact-training step ms | speedup |",
        "|---|---:|---:|---:|---:|",
        f"| {args.train_variant} | {args.train_batch} | {m:.0f} ({min(t['masked']):.0f}) | "
        f"{c:.0f} ({min(t['compact']):.0f}) | {m / c:.2f}x |",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = [
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; fp32, eager, {args.size}x{args.size}; ms per batch, median (min) of "
        f"{args.repeats} warm round-robin runs, ratios from the medians; load average at start {load_average():.2f}",
        "",
    ]
    out = list(header)
    if not args.no_infer:
        out += inference_rows(args) + [""]
        out += artifact_rows(args) + [""]
    if not args.no_train:
        out += train_rows(args) + [""]
    print_tables(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
