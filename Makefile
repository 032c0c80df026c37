# Two entry points: `make repro` (set up, then the whole pipeline) and `make test` (set up, then the tests).
# Set-up is idempotent: the venv is (re)installed only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

# Timings and memory of the hot paths on this machine -> reports/bench.json (docs/performance.md); ~10 min.
bench: setup
	$(BIN)/python bench/cpu.py --out reports/bench.json

clean-venv:
	rm -rf $(VENV)
