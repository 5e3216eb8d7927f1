"""Shared CLI plumbing: override checks with close matches, clean error exits."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import signal
import sys
import typing
from typing import Any, Callable

from omegaconf import OmegaConf

from ..errors import UserError

OmegaConf.register_new_resolver("cdnv2_suffix", lambda name: f"-{name}" if name else "", replace=True)


def _fields(schema: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _dataclass_of(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):  # Optional[SomeConfig]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def check_override_keys(argv: list[str], schema: Any, groups: set[str], prog: str) -> str | None:
    """Return an error message for the first override whose key the schema lacks.

    Hydra rejects such keys too, but without naming the close matches; this check runs
    first so that ``trainer.epoch=3`` answers "did you mean trainer.epochs?".
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key == "hydra" or "@" in key or key in groups:
            continue
        node, path = schema, []
        for part in key.split("."):
            fields = _fields(node)
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=3, cutoff=0.6)
                where = ".".join(path) or "the top level"
                options = close or sorted(fields)
                full = [".".join(path + [c]) for c in options]
                hint = f"did you mean {', '.join(full)}?" if close else f"valid keys: {', '.join(full)}"
                switch = (
                    f" (groups you can switch with group=option: {', '.join(sorted(groups))})"
                    if groups else ""
                )
                return (
                    f"{prog}: error: unknown config key {key!r} in override {arg!r}: "
                    f"{where} has no key {part!r}; {hint}{switch}"
                )
            path.append(part)
            sub = _dataclass_of(fields[part])
            if sub is None:
                break
            node = sub
    return None


def make_main(prog: str, schema: Any, groups: set[str], config_name: str,
              task: Callable[[Any], Any]) -> Callable[[], None]:
    """The console entry point: check override keys (close matches), then run Hydra."""
    import hydra

    hydra_main = hydra.main(version_base="1.3", config_path="../configs", config_name=config_name)(task)

    def main() -> None:
        setup_process()
        error = check_override_keys(sys.argv[1:], schema, groups, prog)
        if error:
            print(error, file=sys.stderr)
            sys.exit(2)
        hydra_main()

    return main


def setup_process() -> None:
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


def exit_user_error(prog: str, error: Exception | str) -> typing.NoReturn:
    """One paragraph on stderr, then the error's exit code (2 for a user error)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(getattr(error, "exit_code", 2))
