# Set-up is part of each target, so both Quickstart commands work on a fresh machine.
# On a CUDA machine, install your CUDA build of torch into .venv first, or set TORCH_SPEC.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DS_SOO_DATA ?= $(abspath ../shared/data)
export DS_SOO_DATA
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint bench

$(BIN)/.ds_soo-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.ds_soo-installed

quickstart: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m ds_soo.train --config configs/digits_vit.yaml --compare --out runs/quickstart --overwrite

test: setup
	$(BIN)/ruff check ds_soo tests bench
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/single_device.py --device all
