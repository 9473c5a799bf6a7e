# One-command entry points for a fresh machine. PYTHON picks the interpreter for the venv;
# TORCH picks the torch wheel (the CPU build by default; e.g. TORCH="torch==2.13.0 --index-url ..." for CUDA).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint experiment compare clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the pinned torch goes first so nothing later pulls a CUDA build
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check cgc_lightning datamodules tests benchmarks
	$(BIN)/ruff format --check cgc_lightning datamodules tests benchmarks

clean:
	rm -rf $(VENV) .cache
