"""``--help`` of every command: its own page, fast (no torch, no Hydra), only its keys."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cdnv2.cli import help as cli_help
from helpers import cli

ENTRY = {"cdnv2-train": "train", "cdnv2-eval": "evaluate", "cdnv2-convert": "convert", "cdnv2-viz": "viz"}
TRAIN_ONLY_GROUPS = ("optim=", "sched=", "condense=", "trainer=", "model=", "experiment=")


@pytest.mark.parametrize("prog", sorted(ENTRY))
def test_help_is_the_commands_own_page(prog):
    r = cli(prog, "--help")
    assert r.returncode == 0, r.stderr
    page = r.stdout
    assert page.startswith(f"{prog}: ") and "usage:" in page and "Powered by Hydra" not in page
    for example in cli_help.COMMANDS[prog].examples:
        assert example in page
    if prog == "cdnv2-train":
        assert all(f"  {g}" in page for g in TRAIN_ONLY_GROUPS)
        assert "condense.lasso_lambda" in page and "trainer.epochs" in page and "seed=0" in page
    else:
        assert not any(f"  {g}" in page for g in TRAIN_ONLY_GROUPS), page
        assert "checkpoint=null" in page
    assert cli(prog, "-h").stdout == page


@pytest.mark.parametrize("prog", sorted(ENTRY))
def test_help_imports_neither_torch_nor_hydra(prog):
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        f"sys.argv = [{prog!r}, '--help']\n"
        "from cdnv2.cli import entry\n"
        f"try:\n    entry.{ENTRY[prog]}()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('LOADED', sorted(m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules))\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout[-300:]
    print(f"{prog} --help: {time.perf_counter() - start:.2f} s with interpreter start")  # measured, not asserted


def test_every_listed_key_is_explained():
    for cmd in cli_help.COMMANDS.values():
        for group in cmd.groups:
            if group.schema:
                fields = cli_help.schema_fields(*group.schema)
                assert fields and all(comment for _, comment in fields), (group.name, fields)
    for config in ("train", "eval", "convert", "viz"):
        keys = list(cli_help._yaml_keys(cli_help.CONFIGS / f"{config}.yaml"))
        assert keys and all(comment for _, _, comment in keys), (config, keys)


def test_predict_page_without_its_config_file():
    page = cli_help.render("cdnv2-predict")
    assert "input=" in page and "cdnv2-predict checkpoint=" in page and "optim=" not in page


@pytest.mark.slow  # starts Hydra (and torch): 7-30 s
def test_hydra_help_is_still_hydras():
    r = cli("cdnv2-viz", "--hydra-help", timeout=120)
    assert r.returncode == 0 and "Hydra" in r.stdout, r.stderr
