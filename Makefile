# neuronserve: `make demo` and `make test` work on a fresh clone; both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: venv system-deps test lint typecheck unit demo clean

venv: $(STAMP)

# torch is installed first and pinned: torch==2.13.0 is the CPU wheel; an unpinned torch
# pulled in by another package would fetch several GB of CUDA builds.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian packages (nginx for deployments, hey for comparisons), installed when missing.
system-deps:
	./scripts/system-deps.sh

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: venv
	$(VENV)/bin/mypy

unit: venv system-deps
	$(VENV)/bin/pytest -q

test: lint typecheck unit

demo: venv system-deps
	./scripts/demo.sh

clean:
	rm -rf trace-models run results .mypy_cache .ruff_cache .pytest_cache
