# Two entry points: `make repro` (set up, then the whole pipeline) and `make test` (set up, then the tests).
# Set-up is idempotent: the venv is (re)installed only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro real paper test bench ablations exps clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: setup
	dvc repro

# Real scale (README "Running at real scale"): rewrite params.yaml from the presets in params/, then the DAG.
# Needs the hub (FLUX.1-dev licence accepted, `huggingface-cli login`) or local paths, and GPUs to be useful.
real: setup
	$(BIN)/python -m pipeline.preset real
	dvc repro

paper: setup
	$(BIN)/python -m pipeline.preset real paper
	dvc repro

test: setup
	$(BIN)/python -m pytest

# Timings and memory of the hot paths on this machine -> reports/bench.json (docs/performance.md); about 8 min.
bench: setup
	$(BIN)/python bench/cpu.py --out reports/bench.json

# The paper's Tables 3, 4, B, C and D as DVC experiments on top of the current commit (the default run first),
# then reports/ablations.md; reruns only what is missing. 72-86 min on 2 cores after `make repro` with one worker
# (107-134 min on a slower AMD EPYC; 93 min there with the two workers below; README "Ablations").
ABLATIONS_JOBS ?= 2
ablations: setup
	dvc repro
	$(BIN)/python -m pipeline.ablations run --jobs $(ABLATIONS_JOBS)

# Experiments side by side, only the headline metrics and the params the ablations sweep.
exps: setup
	dvc exp show --drop '.*' --keep 'Experiment|Created|sfo\.pairs$$|sfo\.direct|loss\.beta|sfo\.timesteps|sfo\.timestep_mu|sfo\.timestep_sigma|cdns\.image|cdns\.text|cdns\.blur_radius|sfo\.lora_rank|sfo\.seed|sfo\.(dino|clip_i|clip_t|id_acc)$$|sfo_minus_sft\.(dino|clip_i|clip_t|id_acc)$$'

clean-venv:
	rm -rf $(VENV)
