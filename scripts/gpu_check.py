#!/usr/bin/env python
"""GPU check: the training step, AMP, EMA, compact inference and a short run, in one table.

    PYTHONPATH=src python scripts/gpu_check.py             # one GPU, under 5 minutes
    PYTHONPATH=src python scripts/gpu_check.py --quick --device cpu   # seconds, small sizes

Needs torch (and torchvision only where cdnv2 itself needs it), not Hydra: it builds the
trainer from the dataclass config and never imports ``cdnv2.cli``. Every training step
timed is the trainer's own ``train_step`` + ``after_step`` (fused SGD, loss flags kept on
the device, EMA on), fed with synthetic device tensors so the data loader is not measured.

Rows: images/s and peak memory of the masked (first half of training) and
compact-training (second half) steps for each model, precision and memory format; one
EMA update; whether a steady-state step synchronises the host with the device (CUDA:
``torch.cuda.set_sync_debug_mode("error")``); compact over masked inference speed at
batch 1 and the large batch; and the quickstart run (cdnv2_tiny on generated shapes)
shortened to 2 epochs, with its accuracy and masked-compact parity.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import cdnv2
from cdnv2.condense import condensing_layers
from cdnv2.data import DataConfig
from cdnv2.engine import TrainConfig, Trainer, TrainerConfig, train

PRECISIONS = ("fp32", "bf16", "fp16")
AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def make_trainer(args, model: str, precision: str, channels_last: bool, run_dir: str) -> Trainer:
    data = DataConfig(num_train=args.batch, num_val=args.batch, batch_size=args.batch, image_size=args.size)
    cfg = TrainConfig(data=data, resume="never")
    cfg.model.name = model
    # many (never run) epochs: the first condensation step lies far beyond the timed steps
    cfg.trainer = TrainerConfig(
        epochs=10_000, device=args.device, amp=AMP[precision], channels_last=channels_last, ema_decay=0.9998,
        compact_training="true", progress="none", stage_snapshots=False,
        log_every=10**9, checkpoint_minutes=10**6,
    )
    trainer = Trainer(cfg, run_dir)
    fast_kernels(trainer.device)  # whatever the trainer's determinism default: measure fast kernels
    return trainer


def fast_kernels(device: torch.device) -> None:
    torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_compact_training(trainer: Trainer) -> None:
    """Condense every layer now and swap in the compact-training layers, as the trainer does
    at the last condensation step."""
    for _, m in condensing_layers(trainer.model):
        while not m.fully_condensed:
            m.condense_step()
    trainer.ema.sync_structure(trainer.model)
    trainer._swap_to_compact_training()


def batch(args, trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(trainer.device)
    y = torch.randint(0, trainer.data.num_classes, (args.batch,), generator=g).to(trainer.device)
    return x, y


def timed_steps(trainer: Trainer, x, y, warmup: int, steps: int) -> float:
    """Images/s of the trainer's step; one host sync at the end of the timed steps."""
    for _ in range(warmup):
        trainer.train_step(x, y)
        trainer.after_step()
    sync(trainer.device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
        trainer.after_step()
    sync(trainer.device)
    return steps * x.shape[0] / (time.perf_counter() - t)


def sync_free(trainer: Trainer, x, y) -> str:
    """'none' when two steady-state steps run under CUDA's sync-error mode."""
    if trainer.device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step(x, y)
            trainer.after_step()
        return "none"
    except RuntimeError as e:
        return f"FOUND: {str(e).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def ema_ms(trainer: Trainer, repeats: int = 20) -> float:
    one = torch.ones((), device=trainer.device)
    trainer.ema.update(trainer.model, apply=one)
    sync(trainer.device)
    t = time.perf_counter()
    for _ in range(repeats):
        trainer.ema.update(trainer.model, apply=one)
    sync(trainer.device)
    return 1e3 * (time.perf_counter() - t) / repeats


@torch.no_grad()
def forward_ms(model, x, dtype, repeats: int) -> float:
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with ctx:
        for _ in range(2):
            model(x)
        sync(x.device)
        t = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync(x.device)
    return 1e3 * (time.perf_counter() - t) / repeats


def inference_speedup(args, model_name: str, precision: str, channels_last: bool, bsz: int) -> str:
    device = torch.device(args.device)
    torch.manual_seed(0)
    masked = cdnv2.create_model(model_name).to(device).eval()
    for _, m in condensing_layers(masked):
        while not m.fully_condensed:
            m.condense_step()
    x = torch.randn(bsz, 3, args.size, args.size, device=device)
    compact = cdnv2.convert_model(masked, example_input=x[:2]).to(device).eval()
    if channels_last:
        masked, compact = (m.to(memory_format=torch.channels_last) for m in (masked, compact))
        x = x.contiguous(memory_format=torch.channels_last)
    repeats = args.infer_repeats if bsz == 1 else max(2, args.infer_repeats // 4)
    a = forward_ms(masked, x, DTYPE[precision], repeats)
    b = forward_ms(compact, x, DTYPE[precision], repeats)
    return f"{a / b:.2f}x ({b:.1f} ms)"


def quickstart(args) -> str:
    cfg = TrainConfig(resume="never")
    cfg.trainer = TrainerConfig(epochs=args.quickstart_epochs, device=args.device, progress="none")
    if args.quick:
        cfg.data = DataConfig(num_train=256, num_val=128, batch_size=64)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        r = train(cfg, Path(d) / "run")
        seconds = time.perf_counter() - t
    c = r["compact"]
    return (f"top-1 masked {r['top1']:.2f}% / compact {c['top1']:.2f}%, parity max|diff| "
            f"{c['parity_max_abs_diff']:.1e} (scale {c['parity_output_scale']:.1f}), {seconds:.0f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: cdnv2_tiny, batch 8, 32x32, 1 epoch")
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS,
                   help="default: all three on CUDA; fp32 and bf16 on CPU (fp16 training is CUDA-only)")
    p.add_argument("--no-quickstart", dest="run_quickstart", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default with --quick: 1)")
    args = p.parse_args(argv)
    q = args.quick
    if args.threads or q:  # a shared CPU: one thread avoids OpenMP spin-waits under load
        torch.set_num_threads(args.threads or 1)
    args.variants = args.variants or (["cdnv2_tiny"] if q else ["cdnv2_a", "cdnv2_b", "cdnv2_c"])
    args.batch = args.batch or (8 if q else 256)
    args.size = args.size or (32 if q else 224)
    args.steps = args.steps or (2 if q else 6)
    args.warmup = 1 if q else 3
    args.infer_repeats = 2 if q else 20
    args.quickstart_epochs = 1 if q else 2
    device = torch.device(args.device)
    args.precisions = args.precisions or (list(PRECISIONS) if device.type == "cuda" else ["fp32", "bf16"])
    logging.getLogger("cdnv2").setLevel(logging.WARNING)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.steps} timed steps per cell after {args.warmup} warm-up; cells: images/s (peak GiB)\n")
    settings = [(pr, cl) for pr in args.precisions for cl in (False, True)]
    header = " | ".join(f"{pr}{' CL' if cl else ''}" for pr, cl in settings)
    print(f"| row | model | form | {header} |")
    print("|---|---|---|" + "---|" * len(settings))
    started = time.perf_counter()
    extra = []
    for model in args.variants:
        cells = {"masked": [], "compact_train": [], "ema": [], "sync": []}
        for precision, cl in settings:
            with tempfile.TemporaryDirectory() as d:
                reset_peak(device)
                trainer = make_trainer(args, model, precision, cl, d)
                x, y = batch(args, trainer)
                for form in ("masked", "compact_train"):
                    if form == "compact_train":
                        to_compact_training(trainer)
                        reset_peak(device)
                    ips = timed_steps(trainer, x, y, args.warmup, args.steps)
                    mem = peak_gib(device)
                    cells[form].append(f"{ips:.0f}" + (f" ({mem:.1f})" if mem is not None else ""))
                cells["ema"].append(f"{ema_ms(trainer):.2f}")
                cells["sync"].append(sync_free(trainer, x, y))
                del trainer
        for form in ("masked", "compact_train"):
            print(f"| train img/s, EMA on | {model} | {form} | " + " | ".join(cells[form]) + " |", flush=True)
        print(f"| EMA update ms | {model} | compact_train | " + " | ".join(cells["ema"]) + " |", flush=True)
        print(f"| host syncs in a step | {model} | compact_train | " + " | ".join(cells["sync"]) + " |",
              flush=True)
        for bsz in (1, args.batch):
            row = [inference_speedup(args, model, pr, cl, bsz) for pr, cl in settings]
            print(f"| inference compact/masked | {model} | batch {bsz} | " + " | ".join(row) + " |", flush=True)
    if args.run_quickstart:
        extra.append(f"| quickstart, {args.quickstart_epochs} epoch(s) | cdnv2_tiny | fp32 | {quickstart(args)} |"
                     + " |" * (len(settings) - 1))
    for line in extra:
        print(line)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
