"""cdnv2-predict: classify an image, a folder or a glob with any trained artifact.

    cdnv2-predict checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt input=photos/
    cdnv2-predict checkpoint=model_compact.safetensors input=cat.jpg topk=3
    cdnv2-predict checkpoint=model_compact.onnx input='photos/**/*.jpg' out=results/
    cdnv2-predict checkpoint=runs/<run>/checkpoints/last.pt input=photos/ weights=raw

The artifact's own eval preprocessing and class names are used (see
:class:`cdnv2.Predictor`). A folder is searched recursively for image files
(.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp); a glob may use ``**``.
Writes ``predictions.csv`` and ``predictions.json`` (one row per file: top-k classes
with probabilities, or the reason the file could not be read) into ``out=`` (default
``predictions/`` in the current folder, created if missing; never the run folder) and
prints a summary: images classified, unreadable files, images per predicted class.
Unreadable images are listed, not fatal.
"""
from __future__ import annotations

import collections
import csv
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..data.folders import IMG_EXTENSIONS
from ..engine.logger import Progress
from ..engine.run_dir import check_not_run_file, check_writable
from ..engine.runtime import resolve_device
from ..errors import ConfigError
from ..predict import Prediction, Predictor
from ..tables import format_grid, format_table
from .common import make_main, run_user_command

PROG = "cdnv2-predict"
FILES = ("predictions.csv", "predictions.json")
SHOW_UNREADABLE = 10  # unreadable files listed on the terminal (all are in the files)


@dataclass
class PredictConfig:
    """cdnv2-predict's options (the Hydra schema of configs/predict.yaml)."""

    checkpoint: Optional[str] = None  # compact .pt / .safetensors, training checkpoint, .onnx, OpenVINO .xml, .pt2
    input: Optional[str] = None  # an image, a folder (recursive) or a glob ('photos/**/*.jpg')
    out: str = "predictions"  # folder for predictions.csv / predictions.json
    topk: int = 5  # classes per image (at most the model's number of classes)
    batch_size: int = 64  # images per forward pass
    workers: int = 0  # loader processes decoding images; 0: in this process
    weights: str = "auto"  # training checkpoints: auto | ema | raw
    device: str = "auto"  # PyTorch models: auto | cpu | cuda | cuda:N (exported files: CPU)
    threads: Optional[int] = None  # CPU threads; None: torch's default
    progress: str = "auto"  # auto | bar | lines | none


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


# ----------------------------------------------------------------------------- inputs
def find_images(spec: str) -> list[Path]:
    """The image files named by ``input=``: a file, a folder (recursive) or a glob, sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [Path(root) / name for root, dirs, names in os.walk(path, followlinks=True)
                 for name in names if _is_image(name)]
        return sorted(found)
    if glob.has_magic(spec):
        return sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                      if Path(p).is_file() and _is_image(p))
    raise ConfigError(
        f"input={spec}: no such file or folder. Give an image, a folder of images (searched "
        "recursively) or a quoted glob such as input='photos/**/*.jpg'"
    )


def _is_image(name: str) -> bool:
    return str(name).lower().endswith(IMG_EXTENSIONS) and not Path(name).name.startswith(".")


def check(cfg: PredictConfig) -> tuple[list[Path], Path]:
    """Every option checked before the model is read: (image files, output folder; its
    writability is checked once the model is read)."""
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint=PATH is required: a compact artifact (runs/<run>/model_compact.pt or its "
            ".safetensors), a training checkpoint, or an exported .onnx / OpenVINO .xml file"
        )
    if not Path(cfg.checkpoint).expanduser().exists():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file; give the path of a trained artifact, "
                          "e.g. runs/<run>/model_compact.pt")
    if not cfg.input:
        raise ConfigError("input=PATH is required: an image, a folder of images or a quoted glob "
                          "such as input='photos/**/*.jpg'")
    if cfg.topk < 1 or cfg.batch_size < 1:
        raise ConfigError(f"topk={cfg.topk} and batch_size={cfg.batch_size} must be >= 1")
    if cfg.workers < 0:
        raise ConfigError(f"workers={cfg.workers} must be >= 0 (0 decodes the images in this process)")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be >= 1 (or leave it unset: torch's default)")
    resolve_device(cfg.device)
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; out= names the folder that receives {' and '.join(FILES)}")
    images = find_images(cfg.input)
    if not images:
        raise ConfigError(
            f"input={cfg.input} holds no image files (looked for {' '.join(IMG_EXTENSIONS)}"
            f"{', recursively' if Path(cfg.input).expanduser().is_dir() else ''}); point it at your images"
        )
    for name in FILES:  # e.g. out=<run>/.hydra or <run>/tb: a run's own folders
        check_not_run_file(out / name, "out")
    return images, out


# ----------------------------------------------------------------------------- outputs
def rows(predictions: list[Prediction], unreadable: list[tuple[str, str]]) -> list[dict]:
    """One row per file, in file order: its top-k, or the reason it could not be read."""
    out = [{**p.as_dict(), "error": None} for p in predictions]
    out += [{"file": f, "label": None, "prob": None, "topk": [], "error": why} for f, why in unreadable]
    return sorted(out, key=lambda r: r["file"])


def write_csv(path: Path, table: list[dict], topk: int) -> None:
    header = ["file"] + [f"{what}{k}" for k in range(1, topk + 1) for what in ("label", "prob")] + ["error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in table:
            ranked = [x for t in r["topk"] for x in (t["label"], f"{t['prob']:.6f}")]
            w.writerow([r["file"], *ranked, *[""] * (2 * topk - len(ranked)), r["error"] or ""])


def write_outputs(out: Path, table: list[dict], header: dict, topk: int) -> list[Path]:
    paths = [out / name for name in FILES]
    try:
        write_csv(paths[0], table, topk)
        paths[1].write_text(json.dumps({**header, "rows": table}, indent=1) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; choose another place with out=PATH") from None
    return paths


def summary_table(header: dict, predictions: list[Prediction], unreadable: list, paths: list[Path]) -> str:
    rows_ = [
        ("checkpoint", header["checkpoint"]),
        ("model", header["model"]),
        ("input", f"{header['input']} ({header['files']} files)"),
        ("classified", f"{len(predictions)} images, top-{header['topk']}"),
        ("unreadable", str(len(unreadable))),
        ("speed", f"{header['images_per_second']:.1f} images/s"),
        *[(f"output {p.suffix[1:]}", str(p)) for p in paths],
    ]
    text = format_table(rows_, PROG)
    counts = collections.Counter(p.label for p in predictions)
    if counts:
        n = len(predictions)
        text += "\n" + format_grid(["predicted class", "images", "%"],
                                   [[c, str(k), f"{100 * k / n:.1f}"] for c, k in counts.most_common()],
                                   "top-1 predictions per class")
    for f, why in unreadable[:SHOW_UNREADABLE]:
        text += f"\nunreadable: {f}: {why}"
    if len(unreadable) > SHOW_UNREADABLE:
        text += f"\n... and {len(unreadable) - SHOW_UNREADABLE} more unreadable files (see {paths[0].name})"
    return text


# ----------------------------------------------------------------------------- the command
def run(cfg: PredictConfig) -> dict:
    """Classify ``cfg.input`` with ``cfg.checkpoint``; write the files; print the summary;
    return the JSON header with the rows. Leaves process-wide settings alone."""
    import time

    images, out = check(cfg)
    predictor = Predictor(cfg.checkpoint, device=resolve_device(cfg.device), weights=cfg.weights,
                          batch_size=cfg.batch_size)
    # After the model is read (a refused file creates no folder), before any image is.
    check_writable(out, "output folder", "choose another place with out=PATH")
    bar = Progress(len(images), "predict", cfg.progress, every=max(1, cfg.batch_size))
    start = time.perf_counter()
    predictions, unreadable = predictor.predict_files(images, cfg.topk, progress=bar.update, workers=cfg.workers)
    seconds = time.perf_counter() - start
    bar.close()
    header = {
        "checkpoint": str(predictor.path), "model": predictor.description, "input": cfg.input,
        "files": len(images), "topk": min(cfg.topk, len(predictions[0].labels)) if predictions else cfg.topk,
        "preprocess": predictor.preprocess, "class_names": predictor.class_names,
        "images_per_second": len(predictions) / seconds if seconds > 0 else 0.0,
        "unreadable": len(unreadable),
    }
    table = rows(predictions, unreadable)
    paths = write_outputs(out, table, header, header["topk"])
    print(summary_table(header, predictions, unreadable, paths), flush=True)
    return {**header, "rows": table}


def _run(cfg: DictConfig) -> None:
    predict_cfg: PredictConfig = OmegaConf.to_object(cfg)

    def go():
        if predict_cfg.threads:
            torch.set_num_threads(predict_cfg.threads)
        return run(predict_cfg)

    run_user_command(PROG, go)


main = make_main(PROG, "predict", _run)


if __name__ == "__main__":
    main()
