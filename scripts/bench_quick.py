#!/usr/bin/env python
"""How long `cdnv2-train experiment=quick` takes for every registered model on this CPU.

    python scripts/bench_quick.py [--models cdnv2_tiny cdnv2_a] [--threads 1]

Runs the real command once per model in a temporary folder and prints a table: the
command's wall time (interpreter start, data, training, conversion, parity, compact
eval) and the training time it reports.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cdnv2


def run(model: str, threads: int, folder: Path) -> tuple[float, float | None, int]:
    exe = shutil.which("cdnv2-train", path=str(Path(sys.executable).parent)) or "cdnv2-train"
    run_dir = folder / model
    start = time.perf_counter()
    r = subprocess.run([exe, "experiment=quick", f"model={model}", f"trainer.threads={threads}",
                        "trainer.progress=none", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = run_dir / "report.json"
    train = json.loads(report.read_text())["train_seconds"] if report.is_file() else None
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr)
    return wall, train, r.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = args.models or cdnv2.list_models()
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; trainer.threads={args.threads}")
    print("| model | command wall time (s) | training (s) | exit code |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            wall, train, rc = run(model, args.threads, Path(tmp))
            train_s = f"{train:.1f}" if train is not None else "-"
            print(f"| `{model}` | {wall:.1f} | {train_s} | {rc} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
