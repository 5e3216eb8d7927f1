"""Shared CLI plumbing: config composition with clear errors, clean error exits.

Every command composes its config twice: once here with Hydra's compose API, where a
composition error (unknown key, wrong type, unknown ``group=option``) becomes one
paragraph naming the key with its close matches and exit code 2 before any work; then
by ``@hydra.main`` itself, which runs the job (and sweeps, launchers, callbacks).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import signal
import sys
from typing import Any, Callable, Iterator, Optional, NoReturn

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import signals
from ..errors import ConfigError, UserError



def run_name_suffix(experiment: Optional[str], init: Optional[str], name: Optional[str]) -> str:
    """The part of the default run folder after ``<model>-<data>``.

    ``experiment=finetune init=/w/cdnv2_a.pth.tar name=x`` -> ``-finetune-from-cdnv2_a-x``:
    a fine-tune on the same data as a from-scratch run gets a folder of its own, and the
    same command always names the same folder (so re-running it resumes).
    """
    parts = [str(experiment)] if experiment else []
    if init:
        stem = re.sub(r"(\.(pt|pth|tar|safetensors|bin))+$", "", os.path.basename(str(init).rstrip("/")))
        parts.append("from-" + (re.sub(r"[^A-Za-z0-9_.+-]+", "_", stem) or "init"))
    if name:
        parts.append(str(name))
    return "".join(f"-{p}" for p in parts)


def usable_cpus(at_most: int) -> int:
    """``min(at_most, CPUs this process may use)``: a loader default that torch does not warn
    about on a small machine (its own check counts the CPU affinity the same way)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(at_most), cpus))


OmegaConf.register_new_resolver("cdnv2_run_suffix", run_name_suffix, replace=True)
OmegaConf.register_new_resolver("cdnv2_cpus", usable_cpus, replace=True)

CONFIG_MODULE = "cdnv2.configs"


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``config_name`` with command-line ``overrides`` as the command would.

    Raises :class:`ConfigError` with one paragraph for any mistake, including keys the
    typed schema does not know (also those added with ``+``).
    """
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=overrides)
        except MissingConfigException as e:
            raise ConfigError(_missing_option(e)) from None
        except OverrideParseException as e:
            raise ConfigError(f"cannot parse the overrides {overrides}: {_flat(e)}") from None
        except (HydraException, OmegaConfBaseException) as e:
            cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
            raise ConfigError(_explain(config_name, cause, e)) from None
    unknown = next(_unknown_keys(cfg), None)
    if unknown is not None:
        raise ConfigError(_unknown_key(cfg, unknown))
    return cfg


def _flat(e: BaseException) -> str:
    return " ".join(str(e).split())


def _missing_option(e: MissingConfigException) -> str:
    group, _, name = (e.missing_cfg_file or "").rpartition("/")
    options = sorted(e.options or [])
    if not group or not options:
        return _flat(e)
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(f'{group}={c}' for c in close)}? " if close else ""
    return f"{group}={name}: no such option in group '{group}'; {hint}options: {', '.join(options)}"


def _explain(config_name: str, cause: BaseException, outer: BaseException) -> str:
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (AttributeError, KeyError)) and key:  # unknown key
        return _unknown_key(_defaults(config_name), key)
    message = str(cause).splitlines()[0] if str(cause) else _flat(outer)
    return f"{key}: {message}" if key and key not in message else message


def _defaults(config_name: str) -> DictConfig:
    return compose(config_name, overrides=[])


def _unknown_key(cfg: DictConfig, key: str) -> str:
    parent, _, part = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node.keys() if k != part] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
    full = [f"{parent}.{k}" if parent else k for k in (close or keys)]
    hint = f"did you mean {', '.join(full)}?" if close else f"valid keys: {', '.join(full)}"
    return f"unknown config key {key!r}: {parent or 'the top level'} has no key {part!r}; {hint}"


def _unknown_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Full names of keys in ``node`` that its dataclass schema lacks (added with ``+``)."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    if known is None:  # a free-form dict (e.g. callbacks)
        return
    for key, value in node.items_ex(resolve=False):
        if key not in known:
            yield f"{prefix}{key}"
        else:
            yield from _unknown_keys(value, f"{prefix}{key}.")


def check_command_line(config_name: str, argv: list[str]) -> Optional[str]:
    """The first composition error of this command line, as one paragraph, or None.

    A sweep (``-m key=a,b``) is checked value by value; ranges a sweeper samples
    (``interval(...)``) are left to the sweeper.
    """
    # Hydra has no public parser for its command line; this is the one @hydra.main uses,
    # so the flags (-m, --cfg, --help ...) are read exactly as the command will read them.
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.experimental_rerun is not None:
        return (f"--experimental-rerun {args.experimental_rerun} is not supported: Hydra would unpickle that "
                "file, and unpickling runs any code it holds. Re-run the command with its overrides "
                "instead (a run records them in <run>/.hydra/overrides.yaml).")
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        return f"cannot parse the overrides {args.overrides}: {_flat(e)}"
    fixed, sweeps = [], []
    for o in parsed:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif o.is_discrete_sweep():
            sweeps.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    candidates = [fixed] if not sweeps else [
        fixed + [s[0] for s in sweeps[:i]] + [v] + [s[0] for s in sweeps[i + 1:]]
        for i, values in enumerate(sweeps) for v in values
    ]
    for overrides in candidates:
        try:
            compose_config(config_name, overrides)
        except ConfigError as e:
            return str(e)
    return None


def make_main(prog: str, config_name: str, task: Callable[[Any], Any]) -> Callable[[], None]:
    """The console entry point: check the composition (clear errors), then run Hydra.

    SIGINT/SIGTERM anywhere end the command with one line and exit 130/143 (see
    :mod:`cdnv2.signals`).
    """
    import hydra

    hydra_main = hydra.main(version_base="1.3", config_path="../configs", config_name=config_name)(task)

    def main() -> None:
        try:
            setup_process()
            error = check_command_line(config_name, sys.argv[1:])
            if error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                sys.exit(2)
            hydra_main()
        except signals.StopSignal as e:
            print(f"{prog}: {e}; stopped before finishing, re-run the same command", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    return main


def setup_process() -> None:
    signals.install()  # Ctrl-C / SIGTERM: one line and 130 / 143, never a traceback
    # A file-size limit (ulimit -f) must surface as an OSError we can report, not a kill.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.getLogger("cdnv2").setLevel(logging.INFO)


def run_user_command(prog: str, fn: Callable[[], Any], extra_errors: tuple = ()) -> Any:
    """Run ``fn``; user mistakes become one paragraph on stderr and a non-zero exit."""
    try:
        return fn()
    except (UserError, *extra_errors) as e:
        exit_user_error(prog, e)


def exit_user_error(prog: str, error: Exception | str) -> NoReturn:
    """One paragraph on stderr, then the error's exit code (2 for a user error)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(getattr(error, "exit_code", 2))
