# Set-up and the everyday commands. `make repro` runs the pipeline, `make quick` a few-minute version of it (its own
# DVC experiment), `make test` runs the whole test suite (what CI runs), `make test-fast` every test not marked `slow`
# (the inner loop); each creates the virtualenv (.venv) from the lock file first when it is missing or stale.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro quick test test-fast lint format

setup: $(VENV)/.synced

# --compile-bytecode: every stage and dvc command is a new Python process, which would otherwise compile (~2 s)
# the modules it imports where bytecode is not written (PYTHONDONTWRITEBYTECODE) or not yet written.
$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(VENV)/bin/uv || ($(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install --quiet uv==$(UV_VERSION))
	$(VENV)/bin/uv sync --locked --quiet --compile-bytecode
	touch $@

repro: setup
	dvc repro

# The whole pipeline on profiles/quick.yaml in a few minutes, as its own DVC experiment (the workspace is untouched);
# its stages are forks of one process that has imported the libraries (itm/prefork.py).
# Nothing goes to MLflow unless ITM_TRACKING=on is set.
quick: export ITM_TRACKING ?= off
quick: setup
	python -m itm.profiles profiles/quick.yaml

test: setup lint
	pytest

test-fast: setup lint
	pytest -m "not slow"

lint: setup
	ruff check .
	ruff format --check .

format: setup
	ruff format .
	ruff check --fix .
