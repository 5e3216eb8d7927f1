"""cdnv2-convert: a masked checkpoint becomes the compact artifact, checked and measured.

    cdnv2-convert checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt
    cdnv2-convert checkpoint=cdnv2_c_unconverted.pth.tar official=cdnv2_c out=cdnv2_c_compact.pt
    cdnv2-convert checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt export=all   # export only

The compact model must reproduce the masked model's outputs (parity on random images;
the command fails otherwise). The before/after table shows paper-rule and executed
FLOPs, parameters, file size and timings. ``export=torchscript|onnx|openvino|aoti|executorch``
writes ``<artifact>.torchscript.pt`` / ``.onnx`` / ``.xml`` / ``.pt2`` (AOTInductor) /
``.pte`` (ExecuTorch, XNNPACK) beside the artifact (all but TorchScript in the
runtime-friendly deployment form, docs/deploy.md) and checks each against PyTorch before
it replaces a file of that name; ``export=all`` is the first three. ``quantize=int8`` adds ``<artifact>.int8.onnx`` / ``<artifact>.int8.xml``,
calibrated on training images of the artifact's data config, with an fp32 vs int8 table.
"""
from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..benchmark import compare_costs, cost_rows, device_note
from ..checkpoint import Loaded, open_checkpoint, save_compact
from ..compact import Structure, check_fully_condensed, check_parity, convert_model
from ..condense import condensing_layers
from ..data import DataError
from ..deploy import ExportError, export_and_check, formats_for, require
from ..deploy.export import FORMATS, PACKAGES
from ..deploy.quantize import QUANTIZE
from ..engine.run_dir import check_not_run_file, check_writable
from ..errors import CheckpointError, ConfigError
from ..flops import count_cost
from ..tables import format_grid
from ..engine.runtime import configure_runtime, resolve_device
from .common import make_main, run_user_command

PROG = "cdnv2-convert"
EXPORTS = (*FORMATS[:-1], "safetensors", FORMATS[-1])  # ..., safetensors, all


@dataclass
class ConvertConfig:
    """cdnv2-convert's options (the Hydra schema of configs/convert.yaml)."""

    checkpoint: Optional[str] = None  # training checkpoint, official file or compact artifact
    official: Optional[str] = None  # official file: its variant; None: detected from the keys
    weights: str = "auto"  # auto | ema | raw
    out: Optional[str] = None  # artifact path; None: <checkpoint>_compact.pt beside it
    export: str = "none"  # none | torchscript | onnx | openvino | aoti | executorch | safetensors | all
    quantize: str = "none"  # none | int8: int8 copies of the exported ONNX / OpenVINO files
    calib_images: int = 300  # training images that calibrate the int8 ranges
    parity_samples: int = 8  # random images of the parity check
    bench: bool = True  # time both forms
    cost_batch: int = 32  # throughput batch
    bench_seconds: float = 1.0  # minimum timed seconds per measurement
    device: str = "cpu"  # timing device
    threads: Optional[int] = None  # CPU threads


ConfigStore.instance().store(name="convert_schema", node=ConvertConfig)


def default_out(path: Path) -> Path:
    name = path.name
    for suffix in (".pth.tar", ".pt", ".pth", ".tar", ".ckpt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}_compact.pt")


def _weights_bytes(model: torch.nn.Module) -> int:
    """Size of the model's state dict alone, as torch.save writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _save_artifact(out: Path, compact: torch.nn.Module, loaded: Loaded, format: str = "auto") -> Path:
    metrics = dict(loaded.metrics or {})
    if metrics:
        metrics["measured_on"] = f"{loaded.structure} model of {loaded.path.name}"
    save_compact(
        out, compact, model_name=loaded.model_name, model_kwargs=loaded.model_kwargs,
        class_names=loaded.class_names, preprocess=loaded.preprocess, metrics=metrics or None,
        data=loaded.data_config, seed=loaded.seed, format=format,
    )
    return out


def run(cfg: ConvertConfig) -> dict:
    """Convert (and export) ``cfg.checkpoint``; print the tables; return a summary dict.

    The steps: validate the options, open the checkpoint, convert it (with the parity
    check) and save the artifact, or take the artifact as it is; export and check the
    files; quantize them. Process-wide settings (threads) are the command's, not this
    function's: see :func:`_run`.
    """
    formats = validate(cfg)
    loaded = open_checkpoint(cfg.checkpoint, weights=cfg.weights, official_name=cfg.official)
    if cfg.quantize == "int8":
        from .eval import resolve_data_config

        resolve_data_config(loaded)  # calibration needs the recorded data config: fail before any work
    summary: dict[str, Any] = {"checkpoint": str(loaded.path), "model": loaded.model_name, "kind": loaded.kind}
    if loaded.structure is Structure.COMPACT:
        compact, out = keep_artifact(cfg, loaded)
    else:
        compact, out = convert_and_save(cfg, loaded, summary)
    summary["artifact"] = str(out)
    if cfg.export == "safetensors":  # the weights to share: no pickle, metadata as JSON strings
        shared = _save_artifact(out.with_suffix(".safetensors"), compact, loaded, format="safetensors")
        summary["safetensors"] = str(shared)
        print(f"safetensors: {shared} ({shared.stat().st_size / 1e6:.2f} MB)", flush=True)
    if formats:
        checks = export_files(compact, formats, out, loaded)
        summary["exports"] = [c.as_dict() for c in checks]
        if cfg.quantize == "int8":
            results = quantize_exports(checks, compact, loaded, cfg)
            summary["int8"] = [r.as_dict() for r in results]
            print(int8_table(results, loaded), flush=True)
    return summary


def validate(cfg: ConvertConfig) -> list[str]:
    """Check the options before any work; return the export formats."""
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint=PATH is required: a training checkpoint (runs/<run>/checkpoints/last.pt), an "
            "official CondenseNetV2 file (with official=cdnv2_a|b|c if not detected), or a compact "
            "artifact to export"
        )
    if cfg.parity_samples < 1 or cfg.cost_batch < 1:
        raise ConfigError(f"parity_samples={cfg.parity_samples} and cost_batch={cfg.cost_batch} must be >= 1")
    try:
        formats = [] if cfg.export == "safetensors" else formats_for(cfg.export)
    except ExportError:  # the deploy package does not know the safetensors choice of this command
        raise ExportError(f"export={cfg.export!r}: use one of {', '.join(EXPORTS)}") from None
    require([f for f in formats if f in PACKAGES])
    _check_quantize(cfg, formats)
    if cfg.out:
        _check_out(Path(cfg.out).expanduser())
    resolve_device(cfg.device)
    return formats


def keep_artifact(cfg: ConvertConfig, loaded: Loaded) -> tuple[torch.nn.Module, Path]:
    """A compact artifact as input: nothing to convert; copied to ``out=`` if that is elsewhere."""
    compact, out = loaded.model, loaded.path
    if cfg.out and Path(cfg.out).expanduser().resolve() != loaded.path.resolve():
        out = _save_artifact(Path(cfg.out).expanduser(), compact, loaded)
    print(f"{loaded.path} is already a compact artifact; nothing to convert", flush=True)
    return compact, out


def convert_and_save(cfg: ConvertConfig, loaded: Loaded, summary: dict) -> tuple[torch.nn.Module, Path]:
    """Masked -> compact, checked for parity, saved; the before/after table printed."""
    out = Path(cfg.out).expanduser() if cfg.out else default_out(loaded.path)
    if out.resolve() == loaded.path.resolve():
        raise ConfigError(f"out={out} is the input checkpoint; choose another path")
    _check_out(out)
    masked = loaded.model
    check_convertible(loaded)
    x = torch.randn(cfg.parity_samples, *loaded.input_size, generator=torch.Generator().manual_seed(0))
    try:
        compact = convert_model(masked, example_input=x, check=False)
    except ValueError as e:
        raise ConfigError(f"{loaded.path} cannot be converted: {' '.join(str(e).split())}") from None
    parity = check_parity(masked, compact, x)
    summary["parity"] = {"max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale,
                         "ok": parity.ok, "samples": cfg.parity_samples}
    if not parity.ok:
        raise ConfigError(
            f"parity check failed: the compact model differs from the masked one by "
            f"{parity.max_abs_diff:.3g} at output scale {parity.output_scale:.3g}; nothing was written"
        )
    _save_artifact(out, compact, loaded)
    print(before_after_table(loaded, masked, compact, out, parity, cfg, resolve_device(cfg.device)), flush=True)
    return compact, out


def check_convertible(loaded: Loaded) -> None:
    """A masked model has a compact form once it has LGCs and all of them are fully condensed."""
    if loaded.structure is Structure.MASKED and not condensing_layers(loaded.model):
        raise ConfigError(
            f"{loaded.path}: {loaded.model_name} has no learned group convolutions, so it has no "
            "compact form; it can be evaluated and exported as it is"
        )
    try:
        check_fully_condensed(loaded.model)
    except ValueError as e:
        raise ConfigError(f"{loaded.path}: {' '.join(str(e).split())}") from None


def export_files(compact: torch.nn.Module, formats: list[str], out: Path, loaded: Loaded) -> list:
    """Export beside the artifact, print the table; a file that disagrees with PyTorch is an error
    (and was not written: an earlier file of that name stays)."""
    stem = out.with_suffix("") if out.suffix == ".pt" else out
    source = {"model": loaded.model_name, "model_kwargs": loaded.model_kwargs, "data": loaded.data_config,
              "seed": loaded.seed, "artifact": str(out)}
    checks = export_and_check(compact, formats, stem, loaded.input_size, class_names=loaded.class_names,
                              preprocess=loaded.preprocess, source=source)
    print(export_table(checks), flush=True)
    bad = [c for c in checks if not c.ok]
    if bad:
        raise ExportError(
            "exported file(s) do not match the PyTorch model, so they were not written: "
            + "; ".join(f"{c.path}: max |diff| {c.max_abs_diff:.3g} at scale {c.output_scale:.3g}" for c in bad)
        )
    return checks


def _check_out(out: Path) -> None:
    """``out=`` names the compact artifact (a .pt file); the exports are written beside it."""
    if out.is_dir():
        raise ConfigError(f"out={out} is a folder; give the artifact's file path, e.g. out={out / 'model.pt'}")
    if out.suffix in (".onnx", ".xml", ".bin"):
        raise ConfigError(f"out={out} names the PyTorch artifact, which the exports are written beside "
                          f"({out.stem}.onnx, {out.stem}.xml, ...); give it a .pt name, e.g. "
                          f"out={out.with_suffix('.pt')}")
    check_not_run_file(out, "out")
    check_writable(out.parent, "output folder", "choose another place with out=PATH")


def _check_quantize(cfg: ConvertConfig, formats: list[str]) -> None:
    if cfg.quantize not in QUANTIZE:
        raise ConfigError(f"quantize={cfg.quantize!r}: use one of {', '.join(QUANTIZE)}")
    if cfg.quantize == "none":
        return
    if not {"onnx", "openvino"} & set(formats):
        raise ConfigError(f"quantize={cfg.quantize} quantizes the exported files: add export=onnx, "
                          f"export=openvino or export=all (got export={cfg.export})")
    if cfg.calib_images < 1:
        raise ConfigError(f"calib_images={cfg.calib_images} must be >= 1")
    if "openvino" in formats:
        require(["openvino"])
    import importlib.util

    if "openvino" in formats and importlib.util.find_spec("nncf") is None:
        raise ExportError("quantize=int8 of the OpenVINO file needs nncf (not installed): pip install 'cdnv2[export]'")


def quantize_exports(checks, compact, loaded: Loaded, cfg: ConvertConfig) -> list:
    """int8 copies of the exported ONNX / OpenVINO files, calibrated on the run's training images."""
    from ..data import build_data
    from ..deploy.quantize import calibration_images, compare_int8, openvino_int8_source, top1, val_batches
    from .eval import resolve_data_config

    data_cfg, _ = resolve_data_config(loaded)
    data = build_data(data_cfg, seed=loaded.seed or 0)
    calib = calibration_images(data, cfg.calib_images)
    val = val_batches(data)
    with torch.no_grad():
        torch_top1 = top1(lambda x: compact(torch.from_numpy(x)).numpy(), val)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in checks:
            if c.format not in ("onnx", "openvino"):
                continue
            source = None
            if c.format == "openvino":
                source = openvino_int8_source(compact, calib[0].shape[1:], Path(tmp) / "int8-source.onnx")
            r = compare_int8(c.format, c.path, calib, val, batch=cfg.cost_batch, source=source)
            r.pytorch_top1 = torch_top1
            results.append(r)
    return results


def int8_table(results, loaded: Loaded) -> str:
    rows = [
        [r.format, r.path, f"{r.pytorch_top1:.2f}", f"{r.fp32_top1:.2f}", f"{r.int8_top1:.2f}",
         f"{r.int8_top1 - r.fp32_top1:+.2f}", f"{r.agreement:.1f}", f"{r.fp32_ms:.1f}", f"{r.int8_ms:.1f}",
         f"{r.speedup:.2f}x"]
        for r in results
    ]
    n = results[0].val_images if results else 0
    return format_grid(
        ["runtime", "int8 file", "PyTorch top-1", "fp32 top-1", "int8 top-1", "delta", "same class %",
         f"fp32 ms/{results[0].batch}",
         f"int8 ms/{results[0].batch}", "speed-up"], rows,
        f"int8 vs fp32 ({n} val images of {loaded.model_name}'s data; ms per batch, same runtime)",
    )


def before_after_table(loaded: Loaded, masked, compact, out: Path, parity, cfg: ConvertConfig,
                       device: torch.device) -> str:
    size = loaded.input_size
    models = {"masked": loaded.masked_reference(), "compact": compact}
    if cfg.bench:
        costs = compare_costs(models, size, device, batch=cfg.cost_batch, min_seconds=cfg.bench_seconds)
        header, rows = cost_rows(costs)
    else:
        header, rows = cost_rows({n: count_cost(m, size).as_dict() for n, m in models.items()})
    rows.append(["weights file (MB)", f"{_weights_bytes(models['masked']) / 1e6:.2f}",
                 f"{out.stat().st_size / 1e6:.2f}"])
    title = f"{loaded.model_name}: masked -> compact (per {size[1]}x{size[2]} image, {device_note(device)})"
    return "\n".join([
        format_grid(header, rows, title),
        f"parity: max |diff| {parity.max_abs_diff:.2e} at output scale {parity.output_scale:.2f} "
        f"({cfg.parity_samples} random images): {'ok' if parity.ok else 'MISMATCH'}",
        f"compact artifact: {out}",
    ])


def export_table(checks) -> str:
    rows = [
        [c.format, c.path, f"{c.file_bytes / 1e6:.2f}", f"{c.max_abs_diff:.2e}",
         ",".join(map(str, c.batch_sizes)), "ok" if c.ok else "MISMATCH"]
        for c in checks
    ]
    table = format_grid(["format", "file", "MB", "max |diff|", "batches", "check"], rows, "exports (vs PyTorch)")
    for c in checks:
        if c.op_types:
            table += f"\nONNX operators: {json.dumps(c.op_types)}"
        if c.metadata.get("cdnv2.deploy.summary"):
            table += f"\n{c.format} graph (for {c.metadata['cdnv2.deploy.runtime']}): {c.metadata['cdnv2.deploy.summary']}"
    return table


def _run(cfg: DictConfig) -> None:
    convert_cfg: ConvertConfig = OmegaConf.to_object(cfg)

    def go():
        # torch's default kernels: conversion needs no deterministic mode, and its timings are fp32 defaults
        configure_runtime(convert_cfg.device, deterministic="false", threads=convert_cfg.threads)
        return run(convert_cfg)

    run_user_command(PROG, go, (DataError, CheckpointError))


main = make_main(PROG, "convert", _run)


if __name__ == "__main__":
    main()
