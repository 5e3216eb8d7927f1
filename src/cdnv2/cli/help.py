"""``--help`` of the console commands, answered without importing torch or Hydra.

Each command's page is its description and examples (:data:`COMMANDS`), then the keys
that apply to it, read from the same sources Hydra composes: the command's YAML (its
top-level keys with their defaults and comments) and the dataclass schemas of its
groups (field comments, read from the source text, so nothing heavy is imported).
Hydra's own page stays available as ``--hydra-help``.
"""
from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

PACKAGE = Path(__file__).resolve().parents[1]
CONFIGS = PACKAGE / "configs"


@dataclass(frozen=True)
class Group:
    """A config group: ``name=<option>`` picks a file of configs/<name>/; its keys' schema."""

    name: str
    about: str
    schema: Optional[tuple[str, str]] = None  # (source file under cdnv2/, dataclass name)
    options: Optional[str] = None  # when the options are not files of configs/<name>/


@dataclass(frozen=True)
class CommandHelp:
    about: str
    usage: str
    examples: tuple[str, ...]
    config: str  # configs/<config>.yaml
    groups: tuple[Group, ...] = ()
    notes: tuple[str, ...] = field(default=())


_MODEL = Group("model", "the network", ("engine/config.py", "ModelConfig"),
               options="any name of cdnv2.list_models(): cdnv2_tiny, cdnv2_a/b/c, cdnv2_cifar_s14/s20, "
                       "condensenet_50..122, condensenet_74_c4/c8, densenet121/169")
_DATA = Group("data", "dataset, transforms and loader", ("data/config.py", "DataConfig"))

COMMANDS: dict[str, CommandHelp] = {
    "cdnv2-train": CommandHelp(
        about="Train a model, condense it in scheduled steps, convert it to the compact form, check "
              "parity and print a summary. A run lives in runs/<model>-<data>[-<experiment>]"
              "[-from-<init file>][-<name>]/; re-running the same command resumes it.",
        usage="cdnv2-train [group=option ...] [key=value ...]     cdnv2-train -m key=a,b ...  (a sweep)",
        examples=(
            "cdnv2-train                                        # quickstart: cdnv2_tiny on generated shapes",
            "cdnv2-train experiment=quick model=cdnv2_a         # a seconds-long smoke run of any model",
            "cdnv2-train model=cdnv2_b data=imagenet data.root=/data/imagenet",
            "cdnv2-train data=imagefolder data.root=/my/images data.image_size=64",
            "cdnv2-train experiment=finetune model=cdnv2_a data=imagefolder data.root=/my/images init=w.pth.tar",
            "cdnv2-train -m condense.lasso_lambda=0,1e-5 model=cdnv2_tiny,condensenet_86",
        ),
        config="train",
        groups=(
            _MODEL, _DATA,
            Group("optim", "optimizer and loss", ("engine/config.py", "OptimConfig")),
            Group("sched", "learning-rate schedule", ("engine/config.py", "SchedConfig")),
            Group("condense", "condensation schedule and group lasso", ("condense/schedule.py", "CondenseConfig")),
            Group("trainer", "loop, device, precision, checkpoints, logging", ("engine/config.py", "TrainerConfig")),
            Group("logger", "CSV and TensorBoard logs always; mlflow adds MLflow (sets trainer.mlflow)"),
            Group("experiment", "named presets on top (configs/experiment/)"),
            Group("recipe", "picked by data= (the paper's recipe for that data); not set by hand"),
            Group("hydra/launcher", "multirun (-m) on a cluster: pip install 'cdnv2[cluster]'"),
            Group("hydra/sweeper", "multirun (-m) search: pip install 'cdnv2[search]'"),
        ),
        notes=("--cfg job prints the composed config without running it.",),
    ),
    "cdnv2-eval": CommandHelp(
        about="Evaluate any checkpoint (training checkpoint, compact artifact, official release file) on "
              "the data and preprocessing it records; writes eval.json next to it and prints a table.",
        usage="cdnv2-eval checkpoint=PATH [key=value ...]",
        examples=(
            "cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt",
            "cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt weights=raw",
            "cdnv2-eval checkpoint=converted_cdnv2_a.pth.tar data=imagenet data.root=/data/imagenet",
            "cdnv2-eval checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt cost=true",
        ),
        config="eval",
        groups=(Group("data", "replaces the recorded data config (e.g. another root)", ("data/config.py", "DataConfig")),),
    ),
    "cdnv2-convert": CommandHelp(
        about="Convert a masked checkpoint to the compact model (parity-checked, timed against the "
              "masked one) and optionally export it to TorchScript, ONNX or OpenVINO, with int8 copies.",
        usage="cdnv2-convert checkpoint=PATH [key=value ...]",
        examples=(
            "cdnv2-convert checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt",
            "cdnv2-convert checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt export=all",
            "cdnv2-convert checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt export=onnx quantize=int8",
            "cdnv2-convert checkpoint=converted_cdnv2_a.pth.tar out=cdnv2_a_compact.pt",
        ),
        config="convert",
        notes=("export=onnx|openvino and quantize=int8 need pip install 'cdnv2[export]'.",),
    ),
    "cdnv2-viz": CommandHelp(
        about="Draw PNGs: a checkpoint's learned connectivity (which earlier features each layer "
              "reads) and a run's training curves.",
        usage="cdnv2-viz checkpoint=PATH | run_dir=PATH [key=value ...]",
        examples=(
            "cdnv2-viz run_dir=runs/cdnv2_tiny-shapes",
            "cdnv2-viz checkpoint=runs/cdnv2_tiny-shapes/checkpoints/last.pt out=plots",
            "cdnv2-viz checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt reduce=mean",
        ),
        config="viz",
        notes=("Needs matplotlib: pip install 'cdnv2[viz]'.",),
    ),
    "cdnv2-predict": CommandHelp(
        about="Classify images with any trained artifact, using its own eval preprocessing and class "
              "names: top-k classes with probabilities per file, written as CSV/JSON, and a summary.",
        usage="cdnv2-predict checkpoint=PATH input=IMAGE|FOLDER|GLOB [key=value ...]",
        examples=(
            "cdnv2-predict checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt input=photo.png",
            "cdnv2-predict checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt input=/my/images/",
            "cdnv2-predict checkpoint=model.onnx input='/my/images/*.jpg'",
        ),
        config="predict",
    ),
}

_HELP_FLAGS = ("-h", "--help")


def wants_help(argv: list[str]) -> bool:
    """``-h``/``--help`` among the arguments (``--hydra-help`` is Hydra's own page)."""
    return any(a in _HELP_FLAGS for a in argv)


def render(prog: str, width: int = 100) -> str:
    """The ``--help`` page of ``prog``."""
    cmd = COMMANDS[prog]
    lines = [*textwrap.wrap(f"{prog}: {cmd.about}", width), "", f"usage: {cmd.usage}", "", "examples:"]
    lines += [f"  {e}" for e in cmd.examples]
    keys = list(_yaml_keys(CONFIGS / f"{cmd.config}.yaml"))
    if keys:
        lines += ["", f"keys (key=value; defaults from configs/{cmd.config}.yaml):"]
        lines += _rows([(f"{k}={v}", c) for k, v, c in keys], width)
    if cmd.groups:
        lines += ["", "groups (group=option picks a file of configs/<group>/; group.key=value sets one key):"]
        defaults = _yaml_defaults(CONFIGS / f"{cmd.config}.yaml")
        for g in cmd.groups:
            lines += _group_lines(g, defaults.get(g.name), width)
    lines += ["", *[f"{n}" for n in cmd.notes],
              "--hydra-help shows Hydra's own options. More: README.md and docs/ of the cdnv2 repository."]
    return "\n".join(lines)


def _group_lines(group: Group, default: Optional[str], width: int) -> list[str]:
    options = group.options or ", ".join(_options(group.name))
    text = f"{group.about}; {options}" if options else group.about
    lines = _rows([(f"{group.name}={default or ''}", text)], width)
    if group.schema:
        lines += _rows([(f"  {group.name}.{k}", c) for k, c in schema_fields(*group.schema)], width)
    return lines


def _rows(rows: list[tuple[str, str]], width: int) -> list[str]:
    """Two columns, the second wrapped; a long first cell gets the text on the next line."""
    col = 30
    out = []
    for left, text in rows:
        wrapped = textwrap.wrap(text, width - col - 2) or [""]
        if len(left) + 3 > col:
            out.append(f"  {left}")
            out += [" " * col + w for w in wrapped]
        else:
            out.append(f"  {left:<{col - 2}}{wrapped[0]}".rstrip())
            out += [" " * col + w for w in wrapped[1:]]
    return out


def _options(group: str) -> list[str]:
    folder = CONFIGS / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


_YAML_KEY = re.compile(r"^([A-Za-z_]\w*):\s*(.*?)\s*(?:#\s?(.*))?$")


def _yaml_keys(path: Path) -> Iterator[tuple[str, str, str]]:
    """(key, default, comment) of the top-level keys of a config file (not defaults/hydra)."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        m = _YAML_KEY.match(line)
        if m and m.group(1) not in ("defaults", "hydra"):
            yield m.group(1), m.group(2) or "null", (m.group(3) or "").strip()


_YAML_DEFAULT = re.compile(r"^\s+-\s+(?:optional\s+)?([\w/]+):\s*([\w.-]+)")


def _yaml_defaults(path: Path) -> dict[str, str]:
    """group -> default option of a primary config's defaults list (plain names only)."""
    found = (_YAML_DEFAULT.match(line) for line in path.read_text().splitlines()) if path.is_file() else ()
    return {m.group(1): m.group(2) for m in found if m and m.group(2) != "null"}


def schema_fields(source: str, class_name: str) -> list[tuple[str, str]]:
    """(field, comment) of a dataclass, read from its source text (no import).

    Nested dataclass fields (groups of their own) are left out.
    """
    path = PACKAGE / source
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [
                (item.target.id, _comment(lines[item.lineno - 1]))
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                and not ast.unparse(item.annotation).endswith("Config")
            ]
    raise LookupError(f"{class_name} not found in {path}")


def _comment(line: str) -> str:
    return line.split("  # ", 1)[1].strip() if "  # " in line else ""
