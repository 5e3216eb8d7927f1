"""Time the ExecuTorch / XNNPACK ``.pte`` of the deployment graph in several per-layer forms.

``cdnv2-convert export=executorch`` lowers the deployment graph (``cdnv2.deploy.graph``)
with the forms the per-layer rule picks. This script lowers the same compact model with
one form for every layer (``<lgc>/<3x3>:<preact>``, or ``auto:<preact>`` for the rule),
plus the FLOPs-equal torchvision peer, and times every ``.pte`` round-robin in
ExecuTorch's runtime at one fixed batch size, with each one's max rel diff from the eager
compact model:

    python scripts/bench_xnnpack_forms.py --variants cdnv2_a --repeats 30
    python scripts/bench_xnnpack_forms.py --forms auto:bn dense/grouped:conv
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

from cdnv2.compact import convert_model
from cdnv2.deploy.graph import PREACT_FORMS, DeployError, build_deploy_model, parse_form

from _bench import PEERS, condensed, load_average, parser, print_tables, time_round_robin
from bench_deploy import _xnnpack

DEFAULT_FORMS = ["auto:bn", "auto:conv", "dense/grouped:conv", "grouped/grouped:conv", "grouped/grouped:bn"]


def parse_args(argv=None):
    p = parser(__doc__, variants=["cdnv2_a"], variant_choices=list(PEERS), warmup="untimed rounds first",
               threads_help="torch.set_num_threads for the eager reference (ExecuTorch keeps its own threads)")
    p.add_argument("--forms", nargs="+", default=DEFAULT_FORMS,
                   help="<lgc>/<3x3>:<preact> for every layer, or auto:<preact> (the per-layer rule)")
    p.set_defaults(batch=[1], repeats=30)
    args = p.parse_args(argv)
    if len(args.batch) != 1:
        p.error("--batch: one size (a .pte is lowered for a fixed batch)")
    for f in args.forms:
        form, _, preact = f.partition(":")
        try:
            if form != "auto":
                parse_form(form)
            if preact not in PREACT_FORMS:
                raise DeployError(f"pre-activation {preact!r}: use one of {', '.join(PREACT_FORMS)}")
        except DeployError as e:
            p.error(f"--forms {f!r}: {e} (write <lgc>/<3x3>:<preact> or auto:<preact>, e.g. dense/grouped:conv)")
    return args


def rows_for(name: str, args, tmp: Path) -> list[str]:
    x = torch.randn(args.batch[0], 3, args.size, args.size)
    compact = convert_model(condensed(name)).eval()
    with torch.no_grad():
        ref = compact(x)
    peer = PEERS[name]
    mods = {f"{peer} (peer)": getattr(torchvision.models, peer)(weights=None).eval()}
    for f in args.forms:
        form, preact = f.split(":")
        mods[f] = build_deploy_model(compact, "onnxruntime", forms=None if form == "auto" else form,
                                     preact=preact, input_size=(3, args.size, args.size))
    runs, diffs = {}, {}
    for i, (label, m) in enumerate(mods.items()):
        runs[label] = _xnnpack(m, x, tmp / f"{name}-{i}.pte")
        if label in args.forms:
            diffs[label] = float((runs[label](x) - ref).abs().max() / ref.abs().max())
        print(f"lowered {name} {label}", file=sys.stderr, flush=True)
    t = time_round_robin({k: (lambda r=r: r(x)) for k, r in runs.items()}, args.repeats, args.warmup)
    med = {k: statistics.median(v) for k, v in t.items()}
    base = med[f"{peer} (peer)"]
    diff = {k: f"{v:.1e}" for k, v in diffs.items()}
    return [f"| {name} | {k} | {med[k]:.2f} ({min(t[k]):.2f}) | {med[k] / base:.2f} | {diff.get(k, '-')} |"
            for k in runs]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = [f"ExecuTorch .pte (XNNPACK), batch {args.batch[0]}, {args.size}x{args.size}, fp32; ms per call, "
           f"median (min) of {args.repeats} round-robin runs; load average at start {load_average():.2f}", "",
           "| model | .pte (form for every layer: preact) | ms | / peer | max rel diff vs eager |",
           "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            out += rows_for(name, args, Path(tmp))
    out.append("")
    print_tables(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
