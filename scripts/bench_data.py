"""Would the loader starve the model? Loader images/s next to training-step images/s.

Two pipelines, each measured on this machine's CPU:

* the ImageNet train pipeline (configs/data/imagenet.yaml: RandomResizedCrop 224, flip,
  RandAugment m9 mstd0.5, random erasing) on a generated folder of ImageNet-sized JPEGs,
  next to an SGD step of cdnv2_b at batch 32, 224x224;
* the shapes pipeline (configs/data/shapes.yaml) next to an SGD step of cdnv2_tiny.

Loader and model are timed separately; when training, they share the same cores.

    python scripts/bench_data.py                 # prints a markdown table
    python scripts/bench_data.py --files 200 --workers 0 2
    python scripts/bench_data.py --threads 1     # on a busy machine: no OpenMP oversubscription
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

import cdnv2
from cdnv2.data import DataConfig, build_data

CONFIGS = Path(cdnv2.__file__).parent / "configs" / "data"


def load_config(name: str, **overrides) -> DataConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIGS / f"{name}.yaml"), overrides)
    return OmegaConf.to_object(cfg)


def write_jpegs(root: Path, num_files: int, classes: int = 10, size=(500, 375), seed: int = 0) -> None:
    """ImageNet-like JPEGs: smooth random content (so they compress like photos) at 500x375."""
    rng = np.random.default_rng(seed)
    for i in range(num_files):
        split = "val" if (i // classes) % 10 == 0 else "train"
        folder = root / split / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.JPEG", quality=90)


def loader_rate(cfg: DataConfig, min_images: int) -> float:
    """Train images/s, after the first batch (worker start-up is not counted)."""
    data = build_data(cfg, seed=0)
    seen, epoch, start = 0, 0, None
    while start is None or seen < min_images:
        data.set_epoch(epoch)
        for images, _ in data.train_loader:
            if start is None:
                start = time.perf_counter()  # first batch: warm-up
                continue
            seen += images.shape[0]
        epoch += 1
    return seen / (time.perf_counter() - start)


def model_rate(name: str, batch: int, size: int, steps: int) -> float:
    """Images/s of an SGD training step (forward, backward, update)."""
    model = cdnv2.create_model(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="generated JPEGs (500x375)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers to try")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs (shared machines are noisy)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def best(fn, *fn_args) -> float:
        return max(fn(*fn_args) for _ in range(args.repeat))

    load_before = os.getloadavg()[0]
    logging.basicConfig(level=logging.ERROR)  # the 10-class "imagenet" warns about its class count

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_jpegs(Path(tmp), args.files)
        print(f"wrote {args.files} JPEGs (500x375) in {time.perf_counter() - t0:.1f}s")
        b_rate = best(model_rate, "cdnv2_b", 32, 224, args.steps)
        for w in args.workers:
            cfg = load_config("imagenet", root=tmp, batch_size=32, num_workers=w)
            rate = best(loader_rate, cfg, 2 * args.files)
            rows.append(("imagenet train (JPEG 500x375 -> 224)", w, rate, "cdnv2_b, batch 32, 224", b_rate))
    tiny_rate = best(model_rate, "cdnv2_tiny", 64, 32, 4 * args.steps)
    for w in args.workers:
        cfg = load_config("shapes", batch_size=64, num_workers=w)
        rate = best(loader_rate, cfg, 10000)
        rows.append(("shapes train (32x32)", w, rate, "cdnv2_tiny, batch 64, 32", tiny_rate))

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, load average {load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after, best of {args.repeat}\n")
    print("| pipeline | workers | loader img/s | model step (SGD) | model img/s | loader / model |")
    print("|---|---:|---:|---|---:|---:|")
    for pipeline, w, rate, model, m_rate in rows:
        print(f"| {pipeline} | {w} | {rate:.0f} | {model} | {m_rate:.1f} | {rate / m_rate:.1f}x |")


if __name__ == "__main__":
    main()
