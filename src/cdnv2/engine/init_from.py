"""Start a run from pretrained weights: ``cdnv2-train init=PATH``.

``init`` is not ``resume``: only weights (and masks) come over; the run keeps its own
directory, schedule, optimizer and step 0. Any file ``cdnv2-eval`` opens works: a
training checkpoint (masked or compact-training), a compact artifact, or an official
release file, converted or not. The source is brought into the *masked* layout of the
configured model (:func:`masked_state`: a compact layer becomes its mask plus the
dense weight with zeros at the pruned connections), so the trainer needs no special
path: a fully condensed source leaves every layer at its last stage, the schedule has
nothing left to do, and the trainer switches to compact training before step 1; a
dense or partly condensed source continues condensing from its stage (see
:class:`~cdnv2.condense.Condenser` ``from_current_stage``), or from scratch with
``condense.restart=true``.

Head: the classifier (``model.classifier_name``) is re-initialised, and reported by
name, when the class count differs or both sides know their class names and they
differ. Any other difference of architecture is a :class:`ConfigError` that lists it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import open_checkpoint
from ..errors import CheckpointError, ConfigError
from ..compact.fold import masked_layer_state
from ..layers import CondensingConv1x1
from ..tables import format_table

INIT_WEIGHTS = ("ema", "raw")
_KINDS = {"train": "training checkpoint", "compact": "compact artifact", "official": "official release file"}
# Options that change no tensor shape and no computation of a loaded model.
_IGNORED_KWARGS = {"num_classes", "sfr_zero_init"}


@dataclass
class InitReport:
    """What ``init=PATH`` did, for the log table and report.json."""

    source: str
    kind: str  # train | compact | official
    model_name: str
    structure: str  # masked | compact_train | compact (as stored)
    weights: str  # ema | raw
    condensation: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    reinit_reason: str = ""
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("source", f"{_KINDS.get(self.kind, self.kind)}: {self.model_name} ({self.structure}), "
                       f"{self.weights} weights"),
            ("condensation", self.condensation),
            ("loaded", f"{len(self.loaded)} tensors: {_summarise(self.loaded)}"),
            ("re-initialised", (", ".join(self.reinitialised) + f" ({self.reinit_reason})")
             if self.reinitialised else "nothing"),
            ("ignored", "; ".join(self.ignored) or "nothing"),
            *(("note", n) for n in self.notes),
        ]
        return format_table(rows, f"init={self.source}")

    def as_dict(self) -> dict:
        return asdict(self)


def _summarise(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        top = k.split(".")[0] if not k.startswith("features.") else ".".join(k.split(".")[:2])
        counts[top] = counts.get(top, 0) + 1
    if len(counts) > 6:  # group by the first component only
        counts = {}
        for k in keys:
            counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in counts.items())


def check_init_config(init: str | None, init_weights: str) -> None:
    """The cheap checks, done before data or model are built."""
    if init_weights not in INIT_WEIGHTS:
        raise ConfigError(f"init_weights={init_weights!r}: use ema (the EMA weights when the file has them) or raw")
    if init is not None and not _is_file(init):
        raise ConfigError(
            f"init={init!r}: no such file. Give a cdnv2 checkpoint (runs/.../checkpoints/last.pt), a "
            "compact artifact (model_compact.pt) or an official CondenseNetV2 release file; to continue "
            "an interrupted run use resume=... instead"
        )


def _is_file(path: str) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long, ...
        return False


# ----------------------------------------------------------------------------- masked layout
def masked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the masked layout, whatever its structure.

    Compact LGC/SFR/classifier layers become mask + dense weight (zeros where pruned)
    at their final stage; a masked model's state dict is returned as it is.
    """
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        new = masked_layer_state(m)  # the inverse fold (cdnv2.compact.fold)
        if new is None:
            continue
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in new.items()})
    return state


# ----------------------------------------------------------------------------- init
def _arch_differences(source_kwargs: dict, model: nn.Module) -> list[str]:
    ours = model.arch_kwargs() if hasattr(model, "arch_kwargs") else {}
    diffs = []
    for key in sorted((set(ours) | set(source_kwargs)) - _IGNORED_KWARGS):
        if ours.get(key) != source_kwargs.get(key):
            diffs.append(f"{key} {source_kwargs.get(key)!r} in the file vs {ours.get(key)!r} configured")
    return diffs


def _head_reason(loaded, model: nn.Module, class_names: list[str] | None) -> str:
    theirs = int(loaded.model_kwargs.get("num_classes", loaded.num_classes))
    ours = int(model.arch_kwargs().get("num_classes", 0)) if hasattr(model, "arch_kwargs") else 0
    if theirs != ours:
        return f"{theirs} classes in the file, {ours} in the data"
    if loaded.class_names and class_names and list(loaded.class_names) != list(class_names):
        return "same class count, different class names"
    return ""


def _condensation_summary(model: nn.Module) -> str:
    layers = [m for m in model.modules() if isinstance(m, CondensingConv1x1)]
    if not layers:
        return "no condensing layers"
    done = sum(m.fully_condensed for m in layers)
    if done == len(layers):
        return "fully condensed: no pruning left, compact training from the first step"
    if all(int(m.stage) == 0 for m in layers):
        return "dense (stage 0): the full condensation schedule runs"
    stages = sorted({f"{int(m.stage)}/{m.num_steps}" for m in layers})
    return f"partly condensed (stages {', '.join(stages)}): the remaining steps run"


def _ignored(loaded, weights: str) -> list[str]:
    raw = loaded.raw
    out = []
    if loaded.kind == "train":
        out.append("optimizer, step, schedule and RNG state (init is not resume)")
        other = "model_state (raw)" if weights == "ema" else "ema_state"
        if raw.get("ema_state") is not None:
            out.append(f"{other} weights")
    elif loaded.kind == "official":
        other = "state_dict" if weights == "ema" else "state_dict_ema"
        if isinstance(raw.get(other), dict):
            out.append(f"{other} (init_weights={weights})")
        if any(str(k).endswith("._count") for k in (raw.get("state_dict") or raw)):
            out.append("_count buffers (implied by the masks)")
        extra = sorted(str(k) for k in raw if k not in ("state_dict", "state_dict_ema") and not torch.is_tensor(raw[k]))
        if extra:
            out.append("file entries " + ", ".join(extra[:6]))
    return out


def init_model(model: nn.Module, path: str | Path, *, weights: str = "ema", class_names: list[str] | None = None,
               restart: bool = False, model_name: str | None = None,
               preprocess: dict | None = None) -> InitReport:
    """Load ``path``'s weights (and masks) into the freshly built masked ``model``, in place.

    ``weights``: "ema" takes the EMA weights when the file has them, else the raw ones.
    ``restart``: reset every mask to dense (stage 0), keeping the weights.
    ``preprocess``: the run's eval preprocessing, to note a normalisation that differs
    from the one the weights were trained with.
    """
    check_init_config(str(path), weights)
    try:
        loaded = open_checkpoint(path, weights="auto" if weights == "ema" else "raw")
    except CheckpointError as e:
        raise ConfigError(str(e).replace(f"checkpoint={Path(path).expanduser()}", f"init={path}")) from None
    diffs = _arch_differences(loaded.model_kwargs, model)
    source = masked_state(loaded.model)
    target = model.state_dict()
    head = model.classifier_name + "."
    reason = _head_reason(loaded, model, class_names)
    body = {k for k in target if not k.startswith(head)}
    misfits = diffs[:6] + _body_misfits(source, target, body, head)
    if misfits:
        raise ConfigError(
            f"init={path} holds {loaded.model_name} weights that do not fit model={model_name or type(model).__name__}: "
            + "; ".join(misfits) + ". Pick the model the file was trained as (model=...) or another file."
        )
    head_keys = sorted(k for k in target if k.startswith(head))
    if not reason and any(k not in source or source[k].shape != target[k].shape for k in head_keys):
        reason = "its layout differs from the file's"
    take = body if reason else body | set(head_keys)
    state = dict(target)
    for k in take:
        state[k] = source[k].to(target[k].dtype)
    model.load_state_dict(state, strict=True)
    if restart:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, CondensingConv1x1):
                    m.mask.fill_(1.0)
                    m.stage.zero_()
    condensation = _condensation_summary(model)
    if restart:
        condensation = "reset to dense by condense.restart=true: the full schedule runs"
    return InitReport(
        source=str(path), kind=str(getattr(loaded.kind, "value", loaded.kind)), model_name=loaded.model_name,
        structure=str(getattr(loaded.structure, "value", loaded.structure)),
        weights=loaded.weights, condensation=condensation, loaded=sorted(take),
        reinitialised=head_keys if reason else [], reinit_reason=reason, ignored=_ignored(loaded, loaded.weights),
        notes=_normalisation_note(loaded.preprocess, preprocess),
    )


def _body_misfits(source: dict, target: dict, body: set, head: str) -> list[str]:
    """What keeps the file's tensors from filling the model's body: missing, extra, reshaped."""
    missing = sorted(body - set(source))
    unexpected = sorted(k for k in set(source) - set(target) if not k.startswith(head))
    shapes = [f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
              for k in sorted(body & set(source)) if source[k].shape != target[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing in the file (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the model lacks (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
    return parts


def _normalisation_note(theirs: dict | None, ours: dict | None) -> list[str]:
    """Pretrained features expect the normalisation they were trained with."""
    if not theirs or not ours:
        return []
    diff = [k for k in ("mean", "std") if theirs.get(k) is not None and ours.get(k) is not None
            and [round(float(v), 4) for v in theirs[k]] != [round(float(v), 4) for v in ours[k]]]
    if not diff:
        return []
    shown = ", ".join(f"{k} {list(theirs[k])}" for k in diff)
    return [f"the weights were trained with {shown}; the data uses {', '.join(f'{k} {list(ours[k])}' for k in diff)}"
            f" (set data.mean / data.std to match)"]

