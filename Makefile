# Set-up and the two everyday commands. `make repro` runs the pipeline, `make test` runs the test suite; both
# create the virtualenv (.venv) from the lock file first when it is missing or stale.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test lint format

setup: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(VENV)/bin/uv || ($(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install --quiet uv==$(UV_VERSION))
	$(VENV)/bin/uv sync --locked --quiet
	touch $@

repro: setup
	dvc repro

test: setup lint
	pytest

lint: setup
	ruff check .
	ruff format --check .

format: setup
	ruff format .
	ruff check --fix .
