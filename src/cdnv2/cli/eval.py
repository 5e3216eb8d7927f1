"""cdnv2-eval: evaluate a checkpoint on the data and preprocessing it records.

    cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt
    cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt data=shapes
    cdnv2-eval checkpoint=cdnv2_c.pth.tar official=cdnv2_c data=imagenet data.root=/data/imagenet
    cdnv2-eval checkpoint=... cost=true cost_batch=64
    cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt2   # AOTInductor package (export=aoti)

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .. import confusion as per_class
from ..benchmark import compare_costs, cost_rows, device_note
from ..checkpoint import Loaded, open_checkpoint
from ..compact import Structure, convert_model
from ..condense import condensing_layers
from ..data import DataConfig, build_data
from ..data.transforms import check_eval_preprocess
from ..engine.logger import Progress
from ..engine.run_dir import check_not_run_file, check_writable
from ..engine.runtime import AUTOCAST_DTYPES, configure_runtime, deterministic_mode, resolve_device
from ..errors import ConfigError
from ..evaluate import evaluate
from .common import make_main, run_user_command
from ..tables import format_grid, format_table

PROG = "cdnv2-eval"
WORST_CLASSES = 5  # rows of the worst-classes table
PREPROCESS_KEYS = ("image_size", "eval_resize", "interpolation", "mean", "std")

log = logging.getLogger("cdnv2")


@dataclass
class EvalConfig:
    """cdnv2-eval's options (the Hydra schema of configs/eval.yaml)."""

    checkpoint: Optional[str] = None  # training checkpoint, compact artifact, official file or .pt2 package
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
        base["download"] = False  # a downloaded file never makes a command fetch into a folder it names
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
    if amp not in AUTOCAST_DTYPES:
        raise ConfigError(f"amp={amp!r}: use one of {', '.join(AUTOCAST_DTYPES)}")
    channels_last = cfg.channels_last if cfg.channels_last is not None else bool(loaded.trainer.get("channels_last"))
    return (AUTOCAST_DTYPES[amp] if device.type == "cuda" else None), channels_last


def configure_for(cfg: EvalConfig, loaded: Loaded) -> str:
    """The command's process-wide settings: ``threads`` (default: as trained), kernels."""
    threads = cfg.threads or _recorded_threads(loaded.trainer.get("threads"))
    return configure_runtime(cfg.device, deterministic=cfg.deterministic, threads=threads)


def _recorded_threads(value) -> Optional[int]:
    """The run's thread count if it is one this machine can use (a file's value is not trusted)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= (os.cpu_count() or 1)
    return value if ok else None


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
    if str(cfg.checkpoint).endswith(".pt2"):
        loaded = open_aoti_package(Path(cfg.checkpoint).expanduser(), cfg)
    else:
        loaded = open_checkpoint(cfg.checkpoint, weights=cfg.weights, official_name=cfg.official)
    check_out(eval_json_path(cfg.out, loaded.path))
    return loaded


def check_out(path: Path) -> None:
    """Before evaluating: eval.json can be written at ``path`` and is not a run's own file."""
    check_not_run_file(path, "out")
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    check_writable(path.parent, "output folder", f"eval.json cannot be written there; give another "
                   f"place with out=PATH (e.g. out={Path.cwd() / 'eval.json'})")
    for folder in made:  # made only to probe: a refused or failed evaluation leaves no folder (run() makes it)
        folder.rmdir()


def open_aoti_package(path: Path, cfg: EvalConfig) -> Loaded:
    """A ``.pt2`` of ``cdnv2-convert export=aoti``: the package runs the model (CPU), its
    ``.pt2.json`` sidecar says what the artifact recorded (classes, preprocessing, data, seed)."""
    from ..checkpoint import Kind
    from ..deploy.aoti import AOTIPackage
    from ..deploy.export import sidecar

    side = sidecar(path)
    if not path.is_file() or not side.is_file():
        raise ConfigError(f"checkpoint={path}: {'no such file' if not path.is_file() else f'{side.name} is missing'}; "
                          "give a .pt2 written by cdnv2-convert export=aoti, with its .pt2.json beside it")
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{side}: cannot be read as JSON ({' '.join(str(e).split())[:200]}); "
                          "export it again with cdnv2-convert export=aoti") from None
    source = (info.get("source") if isinstance(info, dict) else None) or {}
    if not isinstance(source, dict) or "model" not in source or not isinstance(source.get("data") or {}, dict):
        raise ConfigError(f"{side} does not record the model and data it was exported from; "
                          "export it again with cdnv2-convert export=aoti")
    if info.get("preprocess") is not None:
        check_eval_preprocess(info["preprocess"], str(side))  # a file's values are not trusted
    if cfg.cost or resolve_device(cfg.device).type != "cpu":
        raise ConfigError(f"checkpoint={path} is compiled for the CPU and has no layers to count: use device=cpu "
                          f"without cost=true, or evaluate {source.get('artifact', 'the .pt artifact')} for costs")
    return Loaded(model=AOTIPackage(path), path=path, kind=Kind.COMPACT, model_name=source["model"],
                  model_kwargs=source.get("model_kwargs") or {}, structure=Structure.COMPACT, weights="raw",
                  class_names=info.get("class_names"), preprocess=info.get("preprocess"),
                  data_config=source.get("data"), seed=source.get("seed"))


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
    check_data_fits(loaded, built, data_cfg, data_overrides)
    autocast_dtype, channels_last = _eval_settings(cfg, loaded, device)
    model = loaded.model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    bar = Progress(len(built.val_loader), "eval", cfg.progress, 10**9)
    result = evaluate(model, built.val_loader, device, autocast_dtype=autocast_dtype,
                      channels_last=channels_last, progress=bar, confusion=True)
    bar.close()
    names = loaded.class_names or built.class_names

    record: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "kind": loaded.kind,
        "model": loaded.model_name,
        "structure": loaded.structure,
        "weights": loaded.weights,
        **result.as_dict(),
        **per_class.summary(result.confusion, names),
        "data": {"name": data_cfg.name, "root": data_cfg.root, "source": source, "seed": seed,
                 "eval_batch_size": data_cfg.eval_batch_size},
        "preprocess": built.eval_preprocess,
        "device": device_note(device),
        "recorded_metrics": loaded.metrics or None,
    }
    if cfg.cost:
        record["cost"], cost_table = cost_section(loaded, device, cfg.cost_batch, cfg.bench_seconds)
    note, error = write_record(eval_json_path(cfg.out, loaded.path), record, result.confusion, names,
                               f"{loaded.model_name} on {data_cfg.name}")
    print(summary_table(record), flush=True)
    print(class_tables(record, note), flush=True)
    if cfg.cost:
        print(cost_table, flush=True)
    if error is not None:
        raise error
    return record


def check_data_fits(loaded: Loaded, built, data_cfg: DataConfig, data_overrides: Optional[dict]) -> None:
    """The data's classes are the model's (by name when it records them); warn when the eval
    preprocessing differs from the recorded one without a preprocessing key overridden."""
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


def write_record(path: Path, record: dict, confusion, names: list[str],
                 title: str) -> tuple[Optional[str], Optional[ConfigError]]:
    """Write eval.json and the per-class files beside it; ``record`` gets their paths.

    Returns the per-class files' note and, when the write failed (checked up front, but the
    disk can fill meanwhile), the error to raise once the result has been shown."""
    note = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record["files"], note = per_class.write_files(path, confusion, names, title)
        path.write_text(json.dumps(record, indent=2) + "\n")
        record["eval_json"] = str(path)
    except OSError as e:
        record["eval_json"] = f"not written ({e.strerror or e})"
        return note, ConfigError(f"cannot write {path}: {e.strerror or e}; the result is in the table above. "
                                 "Choose another place with out=PATH")
    return note, None


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


def class_tables(r: dict, note: Optional[str]) -> str:
    """The worst classes (and, when there is no PNG, the largest confusions), plus the files."""
    scores = [per_class.ClassScore(**c) for c in r["per_class"]]
    worst = per_class.worst_classes(scores, WORST_CLASSES)
    rows = [[s.name, str(s.samples), f"{s.accuracy:.1f}",
             f"{s.confused_with} ({s.confused_count})" if s.confused_with else "-"] for s in worst]
    text = format_grid(["class", "images", "top-1 %", "most often predicted instead"], rows,
                       f"the {len(worst)} worst of {len(scores)} classes")
    if note and r["top_confusions"]:
        rows = [[c["true"], c["predicted"], str(c["count"]), f"{c['percent']:.1f}"] for c in r["top_confusions"][:10]]
        text += "\n" + format_grid(["true class", "predicted as", "images", "% of class"], rows, "largest confusions")
    files = [Path(f) for f in r["files"].values() if f]
    text += f"\nper-class files in {files[0].parent}: " + ", ".join(f.name for f in files)
    if note:
        text += f"\n{note}"
    return text


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
