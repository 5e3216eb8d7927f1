"""Every value of a :class:`TrainConfig` checked before anything runs.

``validate_config(cfg)`` checks the type, the range and the meaning of each key of the
schema, and the combinations that would otherwise fail hours into a run: an image too
small for the network, fp16 on a CPU, condensation fractions that do not match the
model's stages, a group lasso over layers the model does not have. Each failure is a
:class:`~cdnv2.errors.ConfigError` (exit 2): one paragraph naming the key, the value
and what to do. The CLI calls it before the run directory exists; :class:`Trainer`
calls it again for Python users. It reads no data and allocates no weights (the model
is built on the meta device), so it takes well under a second.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..condense import LASSO_LAYERS, condensing_layers, fractions_ok, layer_kind
from ..data import DataError, check_data_config
from ..data.config import AUTO_AUGMENTS, memory_bytes
from ..errors import CheckpointError, ConfigError
from ..models import create_model, is_model, unknown_model_message
from .config import (
    AMP_MODES,
    NAN_POLICIES,
    OPTIMIZERS,
    PROGRESS_MODES,
    RESUME_MODES,
    SCHEDULES,
    TrainConfig,
)
from .distributed import distributed_env


from .distill import check_teacher
from .init_from import check_init_config
from .mlflow_logger import check_mlflow
from .optim import resolve_lr
from .runtime import MODES as DETERMINISTIC_MODES


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` (or :class:`CheckpointError` for ``resume``) for the
    first value of ``cfg`` that cannot work; return None if the whole config can run."""
    _check_types(cfg, TrainConfig, "")
    for rule in _RULES:
        rule.check(cfg)
    try:
        check_data_config(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    _check_device(cfg)
    distributed_env()  # a partial torchrun environment: exit 2 before the run dir exists
    _check_schedule(cfg)
    _check_accum(cfg)
    facts = model_facts(cfg.model.name, cfg.model.overrides())
    _check_image_size(cfg, facts)
    _check_model_size(cfg, facts)
    _check_condense(cfg, facts)
    _check_resume(cfg)
    check_init_config(cfg.init, cfg.init_weights)
    check_teacher(cfg.distill)
    check_mlflow(cfg.trainer.mlflow)


# ---------------------------------------------------------------- types
def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of ({_type_name(args[0])})"
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # nan and inf compose fine in Hydra but break every range check
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _check_types(obj: Any, schema: type, prefix: str) -> None:
    if not isinstance(obj, schema):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(
            f"{where} is a {type(obj).__name__}, not a {schema.__name__}; build it as {schema.__name__}(...)."
        )
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, value, tp = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            _check_types(value, tp, key + ".")
        elif not _type_ok(value, tp):
            raise ConfigError(f"{key}={value!r} is not {_type_name(tp)}; give {key} {_type_name(tp)}.")


# ---------------------------------------------------------------- one key at a time
def _get(cfg: TrainConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _default(key: str) -> Any:
    return _get(TrainConfig(), key)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class _Range:
    """``key`` must satisfy ``ok`` (None passes when ``optional``); ``must`` says how."""

    key: str
    ok: Callable[[Any], bool]
    must: str
    example: Any = None  # a valid value for the message; None: the schema's default
    optional: bool = False

    def check(self, cfg: TrainConfig) -> None:
        value = _get(cfg, self.key)
        if value is None and self.optional:
            return
        if not self.ok(value):
            example = self.example if self.example is not None else _default(self.key)
            null = ", or null" if self.optional else ""
            raise ConfigError(
                f"{self.key}={_show(value)} is not allowed: it must be {self.must}. "
                f"Set e.g. {self.key}={_show(example)}{null}."
            )


@dataclass(frozen=True)
class _Choice:
    """``key`` (or each item of a list-valued key) must be one of ``names``."""

    key: str
    names: tuple[str, ...]

    def check(self, cfg: TrainConfig) -> None:
        value = _get(cfg, self.key)
        for item in value if isinstance(value, list) else [value]:
            if item not in self.names:
                close = difflib.get_close_matches(str(item), self.names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(
                    f"{self.key}={_show(value)}: {item!r} is not a known value{hint}; "
                    f"use one of {', '.join(self.names)}."
                )


def _positive_list(v) -> bool:
    return len(v) > 0 and min(v) >= 1


_NAME = re.compile(r"[^/\\\x00-\x1f]+")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_MODEL_INTS = ("bottleneck", "lgc_groups", "lgc_condense", "conv3x3_groups", "sfr_groups", "sfr_condense",
               "stem_stride", "fc_channel")

_RULES: tuple = (
    *(_Range(f"model.{k}", lambda v: v >= 1, ">= 1", 4, optional=True) for k in _MODEL_INTS),
    *(_Range(f"model.{k}", _positive_list, "a non-empty list of whole numbers >= 1", [2, 2, 2], optional=True)
      for k in ("stages", "growth")),
    _Choice("optim.name", OPTIMIZERS),
    _Range("optim.lr", lambda v: v > 0, "> 0 (the peak learning rate; null scales optim.base_lr with "
           "data.batch_size)", 0.1, optional=True),
    _Range("optim.base_lr", lambda v: v > 0, "> 0 (the recipe's lr at optim.ref_batch_size)"),
    _Range("optim.ref_batch_size", lambda v: v >= 1, ">= 1"),
    _Range("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    _Range("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    _Range("optim.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    _Range("optim.mixup_alpha", lambda v: v >= 0, ">= 0 (0: mixup off)"),
    _Range("optim.cutmix_alpha", lambda v: v >= 0, ">= 0 (0: CutMix off)"),
    _Range("optim.head_lr_scale", lambda v: v > 0, "> 0 (the classifier's lr as a multiple of the rest's; "
           "to keep the backbone still use trainer.freeze_epochs)", 10.0),
    _Range("optim.grad_clip", lambda v: v > 0, "> 0 (the largest gradient norm; null: no clipping)", 1.0,
           optional=True),
    _Range("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
           "two numbers in [0, 1) (AdamW's beta1, beta2)", [0.9, 0.999]),
    _Range("optim.eps", lambda v: v > 0, "> 0 (AdamW's epsilon)", 1e-8),
    _Choice("sched.name", SCHEDULES),
    _Range("sched.milestones", lambda v: all(0 < f < 1 for f in v) and list(v) == sorted(v),
           "increasing fractions in (0, 1) of the steps after the warmup (sched=step)", [0.5, 0.75]),
    _Range("sched.decay_rate", lambda v: 0 < v <= 1, "in (0, 1] (sched=step: the lr factor at each milestone)",
           0.1),
    _Range("sched.warmup_epochs", lambda v: v >= 0, ">= 0 (0: no warmup)"),
    _Range("sched.warmup_start_factor", lambda v: 0 <= v <= 1, "in [0, 1] (the warmup's first lr as a "
           "fraction of the peak)"),
    _Range("sched.min_lr", lambda v: v >= 0, ">= 0"),
    # its even spread obeys the fractions' rule exactly when end_fraction itself does
    _Range("condense.end_fraction", lambda v: fractions_ok([v]), "in (0, 1): the fraction of training after "
           "which all pruning is done (the paper: 0.5)"),
    _Range("condense.lasso_lambda", lambda v: v >= 0, ">= 0 (0: group lasso off)"),
    _Choice("condense.lasso_layers", LASSO_LAYERS),
    _Range("condense.bn_recal_batches", lambda v: v >= 0, ">= 0 (training batches that re-estimate the "
           "BatchNorm statistics after each condensation step; 0: off)", 8),
    _Range("condense.fade_fraction", lambda v: 0 <= v < 1, "in [0, 1) (fraction of training over which the "
           "weights each condensation step drops fade to zero before it; 0: off, the paper's hard step)", 0.1),
    _Choice("data.auto_augment", AUTO_AUGMENTS),
    _Range("distill.alpha", lambda v: v >= 0, ">= 0 (weight of the soft-target loss)", 1.0),
    _Range("distill.temperature", lambda v: v > 0, "> 0 (softmax temperature, e.g. 4)", 4.0),
    _Range("distill.teacher", lambda v: bool(v.strip()), "a file or a torchvision model name (null: off)",
           "resnet50", optional=True),
    _Range("distill.teacher_weights", lambda v: bool(v.strip()), "a state_dict file (null: none)",
           "resnet50.pth", optional=True),
    _Range("trainer.epochs", lambda v: v >= 1, ">= 1"),
    _Range("trainer.device", lambda v: bool(_DEVICE.fullmatch(v)), "auto, cpu, cuda or cuda:N", "auto"),
    _Choice("trainer.amp", AMP_MODES),
    _Range("trainer.compact_training", lambda v: v.lower() in ("auto", "true", "false"),
           "auto, true or false (auto: the form measured faster on the device, docs/gpu.md)", "auto"),
    _Range("trainer.ema_decay", lambda v: 0 < v < 1, "in (0, 1) (e.g. 0.9998; null: no EMA)", 0.9998,
           optional=True),
    _Range("trainer.checkpoint_minutes", lambda v: v > 0, "> 0 (minutes between mid-epoch checkpoints)"),
    _Range("trainer.log_every", lambda v: v >= 1, ">= 1 (optimizer steps between log points)"),
    _Choice("trainer.progress", PROGRESS_MODES),
    _Choice("trainer.nan_policy", NAN_POLICIES),
    _Range("trainer.max_bad_steps", lambda v: v >= 0, ">= 0"),
    _Range("trainer.parity_samples", lambda v: v >= 1, ">= 1 (validation images for the compact "
           "model's parity check)"),
    _Range("trainer.max_steps_per_epoch", lambda v: v >= 1, ">= 1 (null: no cap)", 100, optional=True),
    _Range("trainer.freeze_epochs", lambda v: v >= 0, ">= 0 (epochs that train only the classifier; "
           "0: none)", 1),
    _Range("trainer.accum_steps", lambda v: v >= 1, ">= 1 (micro-batches per optimizer step; "
           "data.batch_size stays the batch of one step)", 4),
    _Range("trainer.mlflow_uri", lambda v: bool(v.strip()), "an MLflow tracking URI (null: an SQLite store in "
           "the run folder)", "http://localhost:5000", optional=True),
    _Range("trainer.threads", lambda v: v >= 1, ">= 1 (null: torch's default)", 4, optional=True),
    _Range("trainer.deterministic", lambda v: v.strip().lower() in DETERMINISTIC_MODES,
           "auto (exact on CPU, fast on CUDA), true or false", "auto"),
    _Range("seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    _Range("name", lambda v: bool(_NAME.fullmatch(v)) and v.strip() not in ("", ".", ".."),
           "a non-empty suffix of the run folder's name without '/' (e.g. lr0.2)", "lr0.2", optional=True),
)


# ---------------------------------------------------------------- combinations
def _cuda_wanted(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _check_device(cfg: TrainConfig) -> None:
    t = cfg.trainer
    if t.device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(t.device.split(":")[1]) if ":" in t.device else 0
        if index >= count:
            have = f"this machine has {count} CUDA device(s)" if count else "CUDA is not available on this machine"
            raise ConfigError(
                f"trainer.device={t.device!r}, but {have}. Use trainer.device=cpu, or auto to take "
                "CUDA when it is there."
            )
    if t.amp == "fp16" and not _cuda_wanted(t.device):
        raise ConfigError(
            f"trainer.amp='fp16' needs a CUDA device, but trainer.device={t.device!r} runs on the CPU. "
            "Use trainer.amp=bf16 (CPUs support it) or trainer.amp=none."
        )
    if t.amp == "bf16" and _cuda_wanted(t.device) and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "trainer.amp='bf16': this GPU does not support bfloat16; use trainer.amp=fp16 or none."
        )


def _check_accum(cfg: TrainConfig) -> None:
    n, batch = cfg.trainer.accum_steps, cfg.data.batch_size
    if batch % n:
        raise ConfigError(
            f"trainer.accum_steps={n} does not divide data.batch_size={batch}: each optimizer step's batch "
            f"is cut into {n} equal micro-batches. Use a batch size that is a multiple of {n} (data.batch_size "
            "is the batch of one optimizer step, not the micro-batch)."
        )


def _check_schedule(cfg: TrainConfig) -> None:
    s, epochs = cfg.sched, cfg.trainer.epochs
    if s.warmup_epochs > epochs:
        raise ConfigError(
            f"sched.warmup_epochs={s.warmup_epochs} is longer than the run (trainer.epochs={epochs}): the "
            "learning rate would never reach its peak. Use a warmup of at most trainer.epochs."
        )
    lr = resolve_lr(cfg.optim, cfg.data.batch_size)
    if s.min_lr >= lr:
        raise ConfigError(
            f"sched.min_lr={s.min_lr} is not below the peak learning rate {lr:g} (optim.lr, or optim.base_lr "
            "scaled by data.batch_size / optim.ref_batch_size): the cosine would climb instead of decay. "
            "Lower sched.min_lr (0 is the usual value)."
        )


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about an architecture."""

    downsampling: int  # input pixels per pixel of the last feature map
    condense_steps: dict  # layer kind ("lgc", "sfr", "classifier") -> condensation steps
    parameters: int = 0  # weights and buffers (elements)


def model_facts(name: str, overrides: dict) -> ModelFacts:
    """Build ``name`` with ``overrides`` on the meta device (no memory, no RNG draws) and
    read its total stride and condensation steps; raise ConfigError if it cannot be built."""
    if not is_model(name):
        raise ConfigError(
            f"model.name={name!r}: {unknown_model_message(name)}; use model=<name> with a registered "
            "name (cdnv2.list_models() lists them)."
        )
    return _model_facts(name, json.dumps(overrides, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _model_facts(name: str, overrides_json: str) -> ModelFacts:
    overrides = json.loads(overrides_json)
    try:
        with torch.device("meta"):
            model = create_model(name, **overrides)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        given = ", ".join(f"model.{k}={_show(v)}" for k, v in overrides.items())
        raise ConfigError(
            f"model={name} cannot be built with {given}: {first_line(e)}. Choose values that fit together (the "
            "condense factors must divide the layer widths), or drop the override(s) to use the "
            "variant's own values."
        ) from None
    # The networks are a single path, so the total stride is the product of the strides.
    downsampling = 1
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)):
            stride = m.stride if isinstance(m.stride, int) else m.stride[0]
            downsampling *= int(stride)
    steps: dict[str, int] = {}
    for _, layer in condensing_layers(model):
        steps[layer_kind(layer)] = max(steps.get(layer_kind(layer), 0), layer.num_steps)
    elements = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    return ModelFacts(downsampling, steps, elements)


def first_line(e: BaseException) -> str:
    """The first line of an error's message: torch's C++ errors append their stack frames."""
    return (str(e).strip().splitlines() or [""])[0].strip().rstrip(".:")[:300]


def _check_model_size(cfg: TrainConfig, facts: ModelFacts) -> None:
    memory = memory_bytes()
    # float32 weights, their gradients, optimizer state and the EMA copy: ~4 copies.
    need = 4 * 4 * facts.parameters
    if memory is not None and need > memory:
        given = ", ".join(f"model.{k}={_show(v)}" for k, v in cfg.model.overrides().items()) or "its defaults"
        raise ConfigError(
            f"model={cfg.model.name} with {given} has {facts.parameters:,} weights: training it needs about "
            f"{need / 2**30:,.0f} GiB, and this machine has {memory / 2**30:,.0f} GiB. Choose smaller values."
        )


def _check_image_size(cfg: TrainConfig, facts: ModelFacts) -> None:
    size = cfg.data.image_size
    if size < facts.downsampling:
        raise ConfigError(
            f"data.image_size={size} is too small for model={cfg.model.name}: the network downsamples its "
            f"input {facts.downsampling}x, so nothing would be left of a {size}x{size} image by its last "
            f"block. Use data.image_size >= {facts.downsampling}."
        )


def _check_fractions(key: str, values: Optional[list], steps: Optional[int], model: str) -> None:
    if values is None:
        return
    kind = key.rsplit(".", 1)[1].split("_")[0].upper()
    if not steps:
        raise ConfigError(
            f"{key}={_show(values)}, but model={model} has no {kind} layers that condense. "
            f"Remove the override ({key}=null)."
        )
    example = [round(s / (2 * steps), 4) for s in range(1, steps + 1)]
    if len(values) != steps or not fractions_ok(list(values)):
        raise ConfigError(
            f"{key}={_show(values)} does not fit model={model}: its {kind} layers condense in {steps} "
            f"step(s), so give {steps} strictly increasing fraction(s) of training in (0, 1), e.g. "
            f"{key}={_show(example)}, or null to spread them evenly up to condense.end_fraction."
        )


def _check_condense(cfg: TrainConfig, facts: ModelFacts) -> None:
    c, steps, model = cfg.condense, facts.condense_steps, cfg.model.name
    _check_fractions("condense.lgc_fractions", c.lgc_fractions, steps.get("lgc"), model)
    _check_fractions("condense.sfr_fractions", c.sfr_fractions, steps.get("sfr"), model)
    if c.lasso_lambda > 0 and not any(steps.get(kind) for kind in c.lasso_layers):
        have = sorted(k for k in steps if k in LASSO_LAYERS)
        raise ConfigError(
            f"condense.lasso_lambda={c.lasso_lambda} with condense.lasso_layers={_show(list(c.lasso_layers))}, "
            f"but model={model} has no such layers that condense (it has: {', '.join(have) or 'none'}). "
            "List layer kinds the model has, or set condense.lasso_lambda=0."
        )


def _check_resume(cfg: TrainConfig) -> None:
    if cfg.resume not in RESUME_MODES and not Path(cfg.resume).is_file():
        raise CheckpointError(
            f"resume={cfg.resume!r}: no such file; use resume=auto (the run directory's last "
            "checkpoint), resume=never, or a path to a checkpoint"
        )
