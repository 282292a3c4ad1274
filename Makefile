# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs, runs the main job (`lap demo` on the bundled MNIST)
#   make test   -> creates .venv, installs, runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine install your CUDA build into .venv first.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench install

$(BIN)/lap: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/lap

install: $(BIN)/lap

demo: install
	$(BIN)/lap demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks results
	$(BIN)/ruff format --check src tests benchmarks results

bench: install
	$(BIN)/python benchmarks/prune_speed.py
