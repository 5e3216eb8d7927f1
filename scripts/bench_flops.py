#!/usr/bin/env python
"""The models table of the README: our paper-rule FLOPs/params next to the papers'.

    python scripts/bench_flops.py

Counts at batch 1 with cdnv2.count_cost (SPEC 2 rules); 224x224 for ImageNet models,
32x32 for CIFAR-sized ones. "Executes" is what the masked training model computes.
"""
from __future__ import annotations

import cdnv2

# (published MFLOPs, M params, published top-1 error or accuracy) from the papers
PAPER = {
    "cdnv2_a": ("46", "2.0", "ImageNet top-1 64.4%"),
    "cdnv2_b": ("146", "3.6", "ImageNet top-1 71.9%"),
    "cdnv2_c": ("309", "6.1", "ImageNet top-1 75.9%"),
    "condensenet_74_c4": ("529", "4.8", "ImageNet top-1 73.8%"),
    "condensenet_74_c8": ("274", "2.9", "ImageNet top-1 71.0%"),
    "condensenet_50": ("28.6", "0.22", "CIFAR-10"),
    "condensenet_74": ("51.9", "0.41", "CIFAR-10"),
    "condensenet_86": ("65.8", "0.52", "CIFAR-10"),
    "condensenet_98": ("81.3", "0.65", "CIFAR-10"),
    "condensenet_110": ("98.2", "0.79", "CIFAR-10"),
    "condensenet_122": ("116.7", "0.95", "CIFAR-10"),
}


def main() -> None:
    print("| model | input | paper-rule MFLOPs | paper-rule M params | published | masked model executes (MFLOPs / M params) |")
    print("|---|---|---|---|---|---|")
    for name in cdnv2.list_models():
        model = cdnv2.create_model(name)
        size = 224 if getattr(model, "cfg", None) is None or model.cfg.stem_stride == 2 else 32
        r = cdnv2.count_cost(model, (3, size, size))
        flops, params, note = PAPER.get(name, ("-", "-", "not in a paper"))
        published = f"{flops}M / {params}M ({note})" if flops != "-" else note
        print(f"| `{name}` | {size} | {r.paper_flops / 1e6:.2f} | {r.paper_params / 1e6:.3f} | {published} | "
              f"{r.exec_flops / 1e6:.1f} / {r.params / 1e6:.2f} |")


if __name__ == "__main__":
    main()
