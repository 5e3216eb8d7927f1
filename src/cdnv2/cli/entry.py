"""The console scripts: answer ``--help`` at once, then load the command (torch, Hydra).

Importing a command module builds its Hydra app and imports torch (seconds); ``--help``
needs neither, so it is answered here from :mod:`cdnv2.cli.help`.
"""
from __future__ import annotations

import importlib
import sys

from .help import render, wants_help


def _run(prog: str, module: str) -> None:
    if wants_help(sys.argv[1:]):
        try:
            print(render(prog), flush=True)
        except BrokenPipeError:  # `cdnv2-train --help | head`
            sys.stdout = None
        sys.exit(0)
    importlib.import_module(module).main()


def train() -> None:
    _run("cdnv2-train", "cdnv2.cli.train")


def evaluate() -> None:
    _run("cdnv2-eval", "cdnv2.cli.eval")


def convert() -> None:
    _run("cdnv2-convert", "cdnv2.cli.convert")


def viz() -> None:
    _run("cdnv2-viz", "cdnv2.cli.viz")


def predict() -> None:
    _run("cdnv2-predict", "cdnv2.cli.predict")
