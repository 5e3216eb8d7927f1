#!/usr/bin/env python
"""Speed of the deployed CondenseNetV2 on the CPU in every runtime, next to its peers.

For each variant: the compact model, the masked (uncondensed, dense masked convs) model
and the FLOPs-equal torchvision peer, in PyTorch eager, ONNX Runtime, OpenVINO,
``torch.compile`` (Inductor, ``dynamic=True``: one graph for all batch sizes), AOTInductor
(``.pt2``; ``aoti`` compiled as ``cdnv2-convert`` does, with Inductor's freezing,
``aoti-plain`` with Inductor's defaults) and ExecuTorch with XNNPACK (``.pte``), at each
batch size; ms per batch (224x224, fp32), the median (min) of
--repeats runs timed round-robin over all models and runtimes of that batch (load from
other processes hits all alike), and the ratios from the same run. The compiled
runtimes get what ``cdnv2-convert export=aoti|executorch`` exports for the compact model
(:func:`cdnv2.deploy.program.export_module`: its static forward for torch.compile and
AOTInductor, the deployment graph for XNNPACK) and the masked model and the peer as they
are; ``--own-forward`` adds the compact model's own forward (non-strict ``torch.export``;
``torch.compile`` with graph breaks) as ``compact[own]`` (not for XNNPACK). ``--int8`` adds the statically quantized compact model (random
calibration images: speed only; accuracy is cdnv2-convert's table).

    python scripts/bench_deploy.py --variants cdnv2_b                 # one variant (minutes)
    python scripts/bench_deploy.py --variants cdnv2_b --forms auto dense/grouped auto:bn --batch 32
    python scripts/bench_deploy.py --variants cdnv2_b --profile       # per-op profiles too
    python scripts/bench_deploy.py --variants cdnv2_a cdnv2_b --runtimes eager ort compile aoti xnnpack
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import cdnv2
from cdnv2.deploy import export_onnx
from cdnv2.deploy.sessions import openvino_op_profile, openvino_session, ort_session

from _bench import PEERS, condensed, load_average, parser, print_tables, time_round_robin

# ov-bf16: OpenVINO at bfloat16; aoti: the .pt2 as cdnv2-convert compiles it (Inductor's
# freezing on), aoti-plain: with Inductor's defaults (freezing off), what
# aoti_compile_and_package gives a model unless told otherwise
RUNTIMES = ("eager", "ort", "ov", "ov-bf16", "compile", "aoti", "aoti-plain", "xnnpack")
COMPILED = ("compile", "aoti", "aoti-plain", "xnnpack")


def parse_args(argv=None):
    p = parser(__doc__, variants=["cdnv2_b"], threads_help="threads of every runtime (default: each one's own)")
    p.add_argument("--forms", nargs="+", default=["auto"],
                   help="forms of the compact export: auto or <lgc>/<3x3> (dense/grouped, ...), "
                        "optionally with :bn or :conv, the pre-activation form (auto:bn)")
    p.add_argument("--runtimes", nargs="+", default=["eager", "ort", "ov"], choices=RUNTIMES,
                   help="ov-bf16: OpenVINO at bfloat16 precision (its default on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--int8", action="store_true", help="add int8 rows (OpenVINO/NNCF and ORT, random calibration)")
    p.add_argument("--profile", action="store_true", help="print per-op profiles of the compact/masked files")
    p.add_argument("--xnnpack-batches", nargs="+", type=int, default=None,
                   help="batch sizes of the XNNPACK programs, one .pte each (default: --batch)")
    p.add_argument("--own-forward", action="store_true",
                   help="compiled runtimes: also the compact model's own forward (non-strict torch.export)")
    return p.parse_args(argv)



def plain_onnx(model: torch.nn.Module, path: Path, size: int) -> Path:
    """What a user gets from torch.onnx.export of a model as it is (masked model, peers)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), str(path), dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=17)
    return path


def build_files(name: str, args, tmp: Path) -> tuple[dict, dict]:
    """{label: onnx path per runtime} and {label: eager module} for one variant."""
    masked = condensed(name)
    compact = cdnv2.convert_model(masked, check=False)
    peer_name = PEERS[name]
    peer = getattr(torchvision.models, peer_name)(weights=None).eval()
    example = torch.randn(1, 3, args.size, args.size)
    files, eager = {}, {"compact": compact, "masked": masked, peer_name: peer}
    for form in args.forms:
        label = "compact" if form == "auto" else f"compact[{form}]"
        layer_forms, _, preact = form.partition(":")  # "dense/grouped:bn": forms, pre-activation form
        for rt, runtime in (("ort", "onnxruntime"), ("ov", "openvino")):
            path = tmp / f"{name}-{form.replace('/', '-').replace(':', '-')}-{rt}.onnx"
            export_onnx(compact, example, path, runtime=runtime, preact=preact or None,
                        forms=None if layer_forms == "auto" else layer_forms)
            files.setdefault(label, {})[rt] = path
    for label, model in (("masked", masked), (peer_name, peer)):
        path = plain_onnx(model, tmp / f"{name}-{label}.onnx", args.size)
        files[label] = {"ort": path, "ov": path}
    if args.int8:
        from cdnv2.deploy.quantize import openvino_int8_source, quantize_onnx_file, quantize_openvino_file

        calib = [np.random.default_rng(i).standard_normal((8, 3, args.size, args.size), dtype=np.float32)
                 for i in range(4)]
        files["compact int8"] = {
            "ort": quantize_onnx_file(files["compact"]["ort"], tmp / f"{name}-int8.onnx", calib),
            "ov": quantize_openvino_file(
                openvino_int8_source(compact, example.shape[1:], tmp / f"{name}-int8-src.onnx"),
                tmp / f"{name}-int8.xml", calib),
        }
    return files, eager


def compiled_modules(name: str, eager: dict, args) -> dict:
    """{label: module} that the compiled runtimes compile: the compact model's export module."""
    from cdnv2.deploy.export import _exportable_copy
    from cdnv2.deploy.program import export_module

    mods = {"compact": export_module(eager["compact"], (3, args.size, args.size), target="aoti")}
    if args.own_forward:
        mods["compact[own]"] = _exportable_copy(eager["compact"])
    mods.update({label: m for label, m in eager.items() if label != "compact"})
    return mods


def compiled_callables(mods: dict, args, tmp: Path, batches: list[int]) -> dict:
    """{batch: {(label, runtime): fn}}: torch.compile and AOTInductor take any batch (one
    program each), XNNPACK one program per batch size (ExecuTorch plans memory ahead).
    A model a runtime cannot take is reported and left out (its cell reads "-")."""
    per_batch: dict = {b: {} for b in batches}
    for label, m in mods.items():
        for rt in (r for r in COMPILED if r in args.runtimes):
            if label == "compact[own]" and rt == "xnnpack":
                continue  # its gathers and batched GEMMs stay outside XNNPACK: not a mobile candidate
            print(f"{rt}: {label}", file=sys.stderr, flush=True)
            try:
                for b, fn in _compiled(rt, m, label, args, tmp, batches).items():
                    per_batch[b][(label, rt)] = fn
            except Exception as e:  # noqa: BLE001 - a benchmark row, not a product path
                print(f"{rt}: {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      file=sys.stderr, flush=True)
    return per_batch


def _compiled(rt: str, m: torch.nn.Module, label: str, args, tmp: Path, batches: list[int]) -> dict:
    from cdnv2.deploy.aoti import INDUCTOR_CONFIGS, load_aoti

    slug = label.replace("[", "-").replace("]", "")
    size = (3, args.size, args.size)
    if rt == "compile":
        f = torch.compile(m, dynamic=True)  # one graph for every batch size, like the .pt2
        f(torch.randn(batches[0], *size))  # compile errors surface here, not in the timed loop
        return {b: (lambda x, f=f: f(torch.from_numpy(x))) for b in batches}
    if rt in ("aoti", "aoti-plain"):
        program = _export(m, torch.randn(2, *size), True)
        configs = INDUCTOR_CONFIGS if rt == "aoti" else {}
        run = load_aoti(torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp / f"{slug}-{rt}.pt2"), inductor_configs=configs))
        return {b: (lambda x, f=run: f(torch.from_numpy(x))) for b in batches}
    if label == "compact":  # what export=executorch exports: the deployment graph
        from cdnv2.deploy.program import export_module

        m = export_module(m, size, target="executorch")
    runs = {b: _xnnpack(m, torch.randn(b, *size), tmp / f"{slug}-{b}.pte")
            for b in batches if args.xnnpack_batches is None or b in args.xnnpack_batches}
    return {b: (lambda x, f=run: f(torch.from_numpy(x))) for b, run in runs.items()}


def _export(m: torch.nn.Module, example: torch.Tensor, dynamic: bool):
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    return torch.export.export(m.eval(), (example,), dynamic_shapes=shapes)


def _xnnpack(m: torch.nn.Module, example: torch.Tensor, path: Path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from cdnv2.deploy.executorch import executorch_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = to_edge_transform_and_lower(_export(m, example, False), partitioner=[XnnpackPartitioner()])
    path.write_bytes(program.to_executorch().buffer)
    return executorch_session(path)


def callables(files: dict, eager: dict, args) -> dict:
    fns = {}
    for label, per_rt in files.items():
        if "ort" in args.runtimes:
            fns[(label, "ort")] = ort_session(per_rt["ort"], args.threads, spin=False)
        if "ov" in args.runtimes:
            fns[(label, "ov")] = openvino_session(per_rt["ov"], args.threads)
        if "ov-bf16" in args.runtimes:
            fns[(label, "ov-bf16")] = openvino_session(per_rt["ov"], args.threads, precision="bf16")
    if "eager" in args.runtimes:
        for label, model in eager.items():
            fns[(label, "eager")] = lambda x, m=model: m(torch.from_numpy(x))
    return fns


def table(name: str, batch: int, times: dict, labels: list[str], args) -> list[str]:
    peer = PEERS[name]
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for rt in args.runtimes:
        if (peer, rt) not in med:
            continue  # a runtime without programs at this batch size (--xnnpack-batches)
        cells = [f"{med[(label, rt)]:.1f} ({min(times[(label, rt)]):.1f})" if (label, rt) in med else "-"
                 for label in labels if label != peer]
        c, m, p = med.get(("compact", rt)), med.get(("masked", rt)), med.get((peer, rt))
        i8 = med.get(("compact int8", rt))
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"  # noqa: E731
        rows.append(f"| {name} | {batch} | {rt} | " + " | ".join(cells) + f" | {med[(peer, rt)]:.1f} | "
                    f"{ratio(c, m)} | {ratio(c, p)} | {ratio(c, i8)} |")
    return rows


def header(labels: list[str], name: str) -> list[str]:
    labels = [label for label in labels if label != PEERS[name]]
    return ["| model | batch | runtime | " + " | ".join(f"{lb} ms" for lb in labels)
            + " | peer ms | compact / masked | compact / peer | int8 speed-up |",
            "|---|---:|---|" + "---:|" * (len(labels) + 4)]


def profiles(files: dict, x: np.ndarray, args) -> list[str]:
    out = []
    for label in ("compact", "masked"):
        run = openvino_session(files[label]["ov"], args.threads, perf_counts=True)
        run(x)
        run(x)
        prof = openvino_op_profile(run)
        total = sum(prof.values())
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(prof.items())[:8])
        out.append(f"OpenVINO per-op ms, {label}, batch {x.shape[0]}: total {total:.1f}: {top}")
        out.append(_ort_profile(files[label]["ort"], x, args, label))
    return out


def _ort_profile(path: Path, x: np.ndarray, args, label: str) -> str:
    import json

    run = ort_session(path, args.threads, profile=str(path.with_suffix("")))
    run(x)
    run(x)
    trace = run.session.end_profiling()
    events = json.loads(Path(trace).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3 / 2  # two runs
    top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:8])
    return f"ONNX Runtime per-op ms, {label}, batch {x.shape[0]}: total {sum(totals.values()):.1f}: {top}"


def cpu_name() -> str:
    """The CPU's model name and the instruction sets the runtimes' kernels care about."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
           if f in flags]
    return f"{model} ({' '.join(isa)})"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # eager PyTorch at the runtimes' thread count
    import onnxruntime
    import openvino

    versions = ""
    if "xnnpack" in args.runtimes:
        from importlib.metadata import version

        versions = f", executorch {version('executorch')}"
    out = [f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}"
           f"{versions}, "
           f"{cpu_name()}, {os.cpu_count()} CPUs, threads "
           f"{args.threads or 'runtime default'}; fp32 unless int8, {args.size}x{args.size}, ms per batch, "
           f"median (min) of {args.repeats} warm round-robin runs; load average at start {load_average():.2f}", ""]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name in args.variants:
            files, eager = build_files(name, args, Path(tmp))
            fns = callables(files, eager, args)
            mods = compiled_modules(name, eager, args)
            compiled = compiled_callables(mods, args, Path(tmp), args.batch)
            labels = list(dict.fromkeys([*files, *(label for label in mods if label not in files)]))
            out += header(labels, name)
            for batch in args.batch:
                x = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
                calls = {k: (lambda f=f: f(x)) for k, f in {**fns, **compiled[batch]}.items()}
                times = time_round_robin(calls, args.repeats, warmup=1)
                rows = table(name, batch, times, labels, args)
                print("\n".join(rows), file=sys.stderr, flush=True)
                out += rows
                if args.profile:
                    out += [""] + profiles(files, x, args) + [""]
            out.append("")
    print_tables(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
