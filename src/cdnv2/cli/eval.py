"""cdnv2-eval: evaluate a checkpoint on the data and preprocessing it records.

    cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt
    cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt data=shapes
    cdnv2-eval checkpoint=cdnv2_c.pth.tar official=cdnv2_c data=imagenet data.root=/data/imagenet
    cdnv2-eval checkpoint=... cost=true cost_batch=64

A training checkpoint is evaluated exactly as the trainer's final evaluation (same
``build_data`` call with the recorded data config and seed, same :func:`evaluate`), so
its top-1/top-5/loss equal report.json. ``data=<name>`` replaces the recorded data
config, ``data.key=value`` changes single keys of it; the recorded eval preprocessing
(resize, crop, interpolation, mean, std) applies unless such a key is overridden.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..benchmark import compare_costs, cost_rows, device_note
from ..checkpoint import Loaded, open_checkpoint
from ..compact import Structure, convert_model
from ..condense import condensing_layers
from ..data import DataConfig, build_data
from ..engine.logger import Progress
from ..engine.runtime import configure_runtime, deterministic_mode, resolve_device
from ..errors import ConfigError
from ..evaluate import evaluate
from .common import make_main, run_user_command
from ..tables import format_grid, format_table

PROG = "cdnv2-eval"
PREPROCESS_KEYS = ("image_size", "eval_resize", "interpolation", "mean", "std")
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("cdnv2")


@dataclass
class EvalConfig:
    """cdnv2-eval's options (the Hydra schema of configs/eval.yaml)."""

    checkpoint: Optional[str] = None  # training checkpoint, compact artifact or official file
    official: Optional[str] = None  # official file: its variant; None: detected from the keys
    weights: str = "auto"  # auto | ema | raw
    data: DataConfig = field(default_factory=DataConfig)  # see run(): replaces or patches the recorded one
    seed: Optional[int] = None  # data seed; None: the checkpoint's (0 if none)
    out: Optional[str] = None  # eval.json path or folder; None: next to the checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Optional[str] = None  # none | bf16 | fp16; None: as trained
    channels_last: Optional[bool] = None  # None: as trained
    threads: Optional[int] = None  # CPU threads; None: as trained, else torch's default
    deterministic: str = "auto"  # auto (exact on CPU, fast on CUDA) | true | false
    progress: str = "auto"  # auto | bar | lines | none
    cost: bool = False  # add the cost report
    cost_batch: int = 32  # throughput batch
    bench_seconds: float = 1.0  # minimum timed seconds per measurement


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


# ----------------------------------------------------------------------------- pieces
def _known_fields(d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        log.warning("ignoring recorded data keys this version does not know: %s", ", ".join(unknown))
    return {k: v for k, v in d.items() if k in names}


def resolve_data_config(
    loaded: Loaded, data: Optional[DataConfig] = None, overrides: Optional[dict] = None
) -> tuple[DataConfig, str]:
    """The data config to evaluate on, and where it came from.

    Starts from ``data`` (``data=<name>`` on the command line) or the recorded config,
    applies the recorded eval preprocessing, then the explicit ``overrides``
    (``data.key=value``), which win over both.
    """
    overrides = dict(overrides or {})
    if data is not None:
        base, source = dataclasses.asdict(data), f"command line (data={data.name})"
    elif loaded.data_config is not None:
        base, source = _known_fields(loaded.data_config), "checkpoint"
    else:
        what = {"compact": "this compact artifact", "official": "an official release file"}.get(
            loaded.kind, "this checkpoint"
        )
        raise ConfigError(
            f"{what} ({loaded.path}) does not record its data config; name the data on the command "
            "line, e.g. data=imagenet data.root=/path/to/imagenet (or data=shapes, data=imagefolder "
            "data.root=...). The eval preprocessing recorded in the file is applied to it"
            + (". Evaluating the run's training checkpoint (checkpoints/last.pt) needs no data=..."
               if loaded.kind == "compact" else "")
        )
    if loaded.preprocess:
        p = loaded.preprocess
        crop, resize = int(p["crop"]), int(p["resize"])
        base.update(image_size=crop, eval_resize=resize if resize != crop else None,
                    interpolation=p["interpolation"], mean=list(p["mean"]), std=list(p["std"]))
    base.update(overrides)
    # Only the val loader is used: keep its batch, and let a train split of any size
    # (even smaller than the training batch) pass build_data's checks.
    base["eval_batch_size"] = base.get("eval_batch_size") or base.get("batch_size")
    base["batch_size"] = 1
    if overrides:
        source += " + " + ", ".join(f"data.{k}" for k in sorted(overrides))
    try:
        return DataConfig(**base), source
    except TypeError as e:
        raise ConfigError(f"data config: {e}") from None


def _eval_settings(cfg: EvalConfig, loaded: Loaded, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    amp = cfg.amp if cfg.amp is not None else loaded.trainer.get("amp", "none")
    if amp not in _AMP:
        raise ConfigError(f"amp={amp!r}: use one of {', '.join(_AMP)}")
    channels_last = cfg.channels_last if cfg.channels_last is not None else bool(loaded.trainer.get("channels_last"))
    return (_AMP[amp] if device.type == "cuda" else None), channels_last


def configure_for(cfg: EvalConfig, loaded: Loaded) -> str:
    """The command's process-wide settings: ``threads`` (default: as trained), kernels."""
    threads = cfg.threads or loaded.trainer.get("threads")
    return configure_runtime(cfg.device, deterministic=cfg.deterministic,
                             threads=int(threads) if threads else None)


def eval_json_path(cfg_out: Optional[str], checkpoint: Path) -> Path:
    if cfg_out is None:
        return checkpoint.parent / "eval.json"
    out = Path(cfg_out).expanduser()
    if out.is_dir() or cfg_out.endswith(("/", "\\")):
        return out / "eval.json"
    return out


def describe_class_mismatch(ours: list[str], theirs: list[str], limit: int = 4) -> Optional[str]:
    """None if the class lists agree, else a short description of the differences."""
    if list(ours) == list(theirs):
        return None
    only_ckpt = [c for c in ours if c not in set(theirs)]
    only_data = [c for c in theirs if c not in set(ours)]
    parts = [f"the checkpoint has {len(ours)} classes, the data {len(theirs)}"]

    def show(items):
        return ", ".join(map(repr, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    if only_ckpt:
        parts.append(f"only in the checkpoint: {show(only_ckpt)}")
    if only_data:
        parts.append(f"only in the data: {show(only_data)}")
    if not only_ckpt and not only_data:
        moved = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        parts.append(f"same names in another order ({', '.join(moved[:limit])})")
    return "; ".join(parts)


def cost_section(loaded: Loaded, device: torch.device, batch: int, seconds: float,
                 example: Optional[torch.Tensor] = None) -> tuple[dict, str]:
    """Masked and compact cost side by side (compact converted in memory), or the one form."""
    size = loaded.input_size
    models: dict[str, torch.nn.Module] = {}
    note = ""
    if loaded.structure is Structure.COMPACT:
        models["compact"] = loaded.model
    elif loaded.structure is Structure.MASKED and not condensing_layers(loaded.model):  # e.g. DenseNet: one form
        models[loaded.model_name] = loaded.model
    else:
        models["masked"] = loaded.masked_reference()
        try:
            x = example if example is not None else torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
            models["compact"] = convert_model(loaded.model.cpu(), example_input=x.cpu())
        except ValueError as e:  # not fully condensed yet, or a parity failure
            note = f"no compact form: {' '.join(str(e).split())[:300]}"
    costs = compare_costs(models, size, device, batch=batch, min_seconds=seconds)
    header, rows = cost_rows(costs)
    title = f"cost per {size[1]}x{size[2]} image, {device_note(device)}"
    table = format_grid(header, rows, title)
    if note:
        table += f"\n{note}"
    loaded.model.to(device)
    return {"device": device_note(device), "threads": torch.get_num_threads(), "models": costs,
            **({"note": note} if note else {})}, table


# ----------------------------------------------------------------------------- the command
def load(cfg: EvalConfig) -> Loaded:
    """Check the options and read ``cfg.checkpoint``."""
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint=PATH is required: a training checkpoint (runs/<run>/checkpoints/last.pt), a "
            "compact artifact (runs/<run>/model_compact.pt) or an official release file"
        )
    if cfg.cost_batch < 1 or cfg.bench_seconds < 0:
        raise ConfigError(f"cost_batch={cfg.cost_batch} must be >= 1 and bench_seconds={cfg.bench_seconds} >= 0")
    deterministic_mode(cfg.deterministic)  # a bad value fails before the file is read
    resolve_device(cfg.device)
    return open_checkpoint(cfg.checkpoint, weights=cfg.weights, official_name=cfg.official)


def run(cfg: EvalConfig, data: Optional[DataConfig] = None, data_overrides: Optional[dict] = None,
        loaded: Optional[Loaded] = None) -> dict:
    """Evaluate ``cfg.checkpoint`` (or the already ``loaded`` one); write eval.json; return its
    contents. No Hydra needed, and no process-wide settings changed (see :func:`configure_for`).

    ``data`` replaces the recorded data config, ``data_overrides`` ({key: value}) change
    single keys of it (see :func:`resolve_data_config`); ``cfg.data`` is not read.
    """
    loaded = loaded if loaded is not None else load(cfg)
    device = resolve_device(cfg.device)
    data_cfg, source = resolve_data_config(loaded, data, data_overrides)
    seed = cfg.seed if cfg.seed is not None else (loaded.seed if loaded.seed is not None else 0)
    built = build_data(data_cfg, seed=seed, device_type=device.type)

    if loaded.class_names is not None:
        mismatch = describe_class_mismatch(loaded.class_names, built.class_names)
        if mismatch:
            raise ConfigError(
                f"the classes of {loaded.path} do not match the dataset's (data={data_cfg.name}"
                f"{f', root={data_cfg.root}' if data_cfg.root else ''}): {mismatch}. Evaluate on the "
                "data the model was trained on."
            )
    elif loaded.num_classes != built.num_classes:
        raise ConfigError(
            f"{loaded.path} predicts {loaded.num_classes} classes but data={data_cfg.name} has "
            f"{built.num_classes}; evaluate on the data the model was trained on"
        )
    if loaded.preprocess and built.eval_preprocess != loaded.preprocess and not (
        set(data_overrides or {}) & set(PREPROCESS_KEYS)
    ):
        log.warning("eval preprocessing differs from the one recorded in the checkpoint: %s vs recorded %s",
                    built.eval_preprocess, loaded.preprocess)

    autocast_dtype, channels_last = _eval_settings(cfg, loaded, device)
    model = loaded.model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    bar = Progress(len(built.val_loader), "eval", cfg.progress, 10**9)
    result = evaluate(model, built.val_loader, device, autocast_dtype=autocast_dtype,
                      channels_last=channels_last, progress=bar)
    bar.close()

    record: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "kind": loaded.kind,
        "model": loaded.model_name,
        "structure": loaded.structure,
        "weights": loaded.weights,
        **result.as_dict(),
        "data": {"name": data_cfg.name, "root": data_cfg.root, "source": source, "seed": seed,
                 "eval_batch_size": data_cfg.eval_batch_size},
        "preprocess": built.eval_preprocess,
        "device": device_note(device),
        "recorded_metrics": loaded.metrics or None,
    }
    if cfg.cost:
        record["cost"], cost_table = cost_section(loaded, device, cfg.cost_batch, cfg.bench_seconds)
    path = eval_json_path(cfg.out, loaded.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; choose another place with out=PATH") from None
    record["eval_json"] = str(path)
    print(summary_table(record), flush=True)
    if cfg.cost:
        print(cost_table, flush=True)
    return record


def model_description(r: dict) -> str:
    """``cdnv2_tiny (compact, raw weights)``: the kind of file and its structure, once each."""
    kinds = ", ".join(dict.fromkeys([r["kind"], r["structure"]]))
    return f"{r['model']} ({kinds}, {r['weights']} weights)"


def summary_table(r: dict) -> str:
    p = r["preprocess"]
    rows = [
        ("checkpoint", r["checkpoint"]),
        ("model", model_description(r)),
        ("data", f"{r['data']['name']}{' ' + r['data']['root'] if r['data']['root'] else ''} "
                 f"({r['samples']} images; config from {r['data']['source']})"),
        ("preprocess", f"resize {p['resize']} {p['interpolation']}, crop {p['crop']}"),
        ("top-1 / top-5", f"{r['top1']:.2f}% / {r['top5']:.2f}%"),
        ("loss", f"{r['loss']:.4f}"),
        ("speed", f"{r['images_per_second']:.1f} images/s ({r['device']})"),
    ]
    rec = r.get("recorded_metrics") or {}
    if "top1" in rec:
        rows.append(("recorded in the file", f"{rec['top1']:.2f}% / {rec.get('top5', float('nan')):.2f}%"
                     + (f" (epoch {rec['epoch']})" if "epoch" in rec else "")))
    rows.append(("eval.json", r["eval_json"]))
    return format_table(rows, "cdnv2-eval")


# ----------------------------------------------------------------------------- Hydra shim
def data_arguments(cfg: EvalConfig) -> tuple[Optional[DataConfig], dict]:
    """(replacement config from data=<name> or None, {key: value} of data.key=value overrides)."""
    hc = HydraConfig.get()
    keys = set()
    for item in hc.overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("data."):
            keys.add(key.split(".")[1])
    replacement = cfg.data if hc.runtime.choices.get("data") else None
    return replacement, {k: getattr(cfg.data, k) for k in sorted(keys)}


def _run(cfg: DictConfig) -> None:
    eval_cfg: EvalConfig = OmegaConf.to_object(cfg)

    def go():
        loaded = load(eval_cfg)
        configure_for(eval_cfg, loaded)
        return run(eval_cfg, *data_arguments(eval_cfg), loaded=loaded)

    run_user_command(PROG, go)


main = make_main(PROG, "eval", _run)


if __name__ == "__main__":
    main()
