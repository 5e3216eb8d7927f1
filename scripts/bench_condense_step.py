#!/usr/bin/env python
"""How much accuracy a condensation step costs, and how much of it is stale BatchNorm.

Trains cdnv2_tiny (the quickstart recipe by default) and, around every condensation
step, evaluates the model on the validation split right before the step and right
after it: with the BatchNorm running statistics left as they were, and on a copy whose
statistics are re-estimated on ``--recal-batches`` training batches
(:func:`cdnv2.engine.bn_recal.recalibrate_bn`). The run trains with
``condense.bn_recal_batches=0`` (the old behaviour), so the table separates the damage
of the pruning itself from that of stale statistics. A second run (``--with-fix``)
trains with the re-estimation on and reports the same before/after numbers and its
final accuracy.

    python scripts/bench_condense_step.py                       # quickstart (shapes, 6 epochs)
    python scripts/bench_condense_step.py --data digits --epochs 30   # scikit-learn digits
    python scripts/bench_condense_step.py --with-fix --threads 2
    python scripts/bench_condense_step.py --only-fix            # just the run with the fix
    python scripts/bench_condense_step.py --data digits --only-fix -- condense.fade_fraction=0.1  # gentle steps

With ``condense.fade_fraction`` the table also has the top-1 at the step where each
step's fade began ("before its fade").

``--data digits`` writes scikit-learn's 8x8 digits (1,797 images) as a 32 px
ImageFolder under the output folder (needs scikit-learn). Extra Hydra overrides go
after ``--``. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from cdnv2.compact import Structure
from cdnv2.engine.bn_recal import recal_loader, recalibrate_bn
from cdnv2.engine.trainer import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["shapes", "digits"], default="shapes")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (shapes 6, digits 30)")
    p.add_argument("--recal-batches", type=int, default=8, help="batches for the re-estimated column")
    p.add_argument("--with-fix", action="store_true", help="also train with condense.bn_recal_batches on")
    p.add_argument("--only-fix", action="store_true", help="only the run with condense.bn_recal_batches on")
    p.add_argument("--only-stale", action="store_true", help="only the run with condense.bn_recal_batches=0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    return p.parse_args(argv)


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as a train/ + val/ ImageFolder of 32 px RGB PNGs (80/20 split)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(digits.target), generator=g).tolist()
    cut = int(0.8 * len(order))
    for rank, i in enumerate(order):
        split = "train" if rank < cut else "val"
        folder = root / split / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
    return root


class StepProbe(Trainer):
    """A Trainer that evaluates around every condensation step (a measurement, not product code)."""

    recal_batches = 8

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[dict] = []
        self.before_fade: float | None = None  # top-1 before the fade of the next step began

    def _top1(self, model) -> float:
        return self.run_eval(model, "probe").top1

    def _recal_copy(self, model):
        clone = copy.deepcopy(model)
        loader = recal_loader(self.data, seed=self.cfg.seed + 1, step=self.step,
                              num_batches=self.recal_batches, epoch=self.epoch)
        recalibrate_bn([clone], (images.to(self.device) for images, _ in loader))
        return clone

    def after_step(self) -> None:
        masked = self.structure is Structure.MASKED
        if masked and self.condenser.fading(self.step + 1) and not self.condenser.fading(self.step):
            self.before_fade = self._top1(self.eval_model())  # condense.fade_fraction: its ramp starts now
        due = masked and self.condenser.due(self.step + 1)
        if not due:
            return super().after_step()
        model = self.eval_model()
        row = {"step": self.step + 1, "epoch": round((self.step + 1) / self.steps_per_epoch, 2)}
        row["before_fade"], self.before_fade = self.before_fade, None
        row["before"] = self._top1(model)
        row["before_recal"] = self._top1(self._recal_copy(model))
        super().after_step()
        model = self.eval_model()
        row["density"] = round(sum(self.condenser.density().values()) / len(self.condenser.density()), 3)
        row["after"] = self._top1(model)
        row["after_recal"] = self._top1(self._recal_copy(model))
        self.rows.append(row)
        print("row", row, file=sys.stderr, flush=True)  # partial results survive a killed run


def run(overrides: list[str], run_dir: Path, recal_batches: int, threads: int) -> tuple[list[dict], dict]:
    from cdnv2.cli.train import compose_train_config
    from cdnv2.engine.config import TrainConfig
    from cdnv2.engine.runtime import configure_runtime

    cfg = compose_train_config(overrides)
    configure_runtime(cfg.trainer.device, deterministic=cfg.trainer.deterministic, threads=threads,
                      seed=cfg.seed, key="trainer.")
    import dataclasses

    run_cfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)})
    StepProbe.recal_batches = recal_batches
    trainer = StepProbe(run_cfg, run_dir)
    report = trainer.fit()
    return trainer.rows, report


def table(title: str, rows: list[dict], report: dict, recal: int) -> str:
    lines = [
        f"**{title}** - final masked top-1 {report['top1']:.2f}%, "
        f"compact {report.get('compact', {}).get('top1', float('nan')):.2f}%",
        "",
        f"| step | epoch | density | before its fade | before | before, BN re-estimated | after | "
        f"after, BN re-estimated ({recal} batches) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fade = "-" if r["before_fade"] is None else f"{r['before_fade']:.1f}"
        lines.append(
            f"| {r['step']} | {r['epoch']} | {r['density']} | {fade} | {r['before']:.1f} | {r['before_recal']:.1f} | "
            f"{r['after']:.1f} | {r['after_recal']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_condense_"))
    base = ["trainer.progress=none", f"trainer.threads={args.threads}", "trainer.stage_snapshots=false"]
    if args.data == "digits":
        root = write_digits(out / "digits")
        base += ["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.eval_resize=32", "data.batch_size=64",
                 "data.hflip=false", "data.random_resized_crop=false", "data.crop_padding=2",
                 "data.num_workers=0", "model.stem_stride=1", f"trainer.epochs={args.epochs or 30}"]
    elif args.epochs:
        base.append(f"trainer.epochs={args.epochs}")
    base += args.overrides
    outputs = []
    runs = [] if args.only_fix else [
        ("condense.bn_recal_batches=0 (stale BN, the old behaviour)", "condense.bn_recal_batches=0", "stale")]
    if (args.with_fix or args.only_fix) and not args.only_stale:
        runs.append((f"condense.bn_recal_batches={args.recal_batches} (re-estimated in training)",
                     f"condense.bn_recal_batches={args.recal_batches}", "fixed"))
    for title, override, name in runs:
        rows, report = run(base + [override], out / name, args.recal_batches, args.threads)
        outputs.append(table(f"{args.data}: {' '.join([title] + args.overrides)}", rows, report, args.recal_batches))
        print(outputs[-1] + "\n", flush=True)
    print(f"runs in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
