# Set-up and everyday commands. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to the builds this machine carries on disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Two stamps: the core (what `make demo` needs) and the dev extra on top (`make test`).
STAMP := $(VENV)/.cdnv2-installed
DEV_STAMP := $(VENV)/.cdnv2-dev-installed

.PHONY: install install-dev demo test test-all bench clean

install: $(STAMP)

install-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

demo: install
	$(VENV)/bin/cdnv2-train

# One pytest run on every core (pytest-xdist, at most 4 workers; the SIGSEGV that once split
# it in two is understood: docs/testing.md).
# Locally the fast default (pyproject: -m 'not slow and not ci'); with CI=true, as CI runs
# `bash .ci/run`, the tests marked `ci` (the long acceptance runs) run too.
XDIST := -n auto --maxprocesses=4
CI_SELECT := $(if $(filter true True TRUE 1 yes,$(CI)),-m 'not slow',)

test: install-dev
	$(PY) -m pytest -q $(XDIST) $(CI_SELECT)

test-all: install-dev
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q $(XDIST) -m ''

bench: install-dev
	$(PY) scripts/bench_convert.py
	$(PY) scripts/bench_data.py

clean:
	rm -rf runs multirun outputs .pytest_cache
