# weightatlas: `make demo` and `make test` work on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo_out

.PHONY: install demo test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned first to the 2.13.0 wheel (on these machines a CPU build served from
# local disk): an unpinned torch would pull a newer, multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

# Train a small network on scikit-learn's digits, save it as safetensors at three
# training steps, ingest them into a store, and show what the store holds.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/python -m weightatlas._demo $(DEMO)
	$(BIN)/weightatlas --store $(DEMO)/store ingest --model digits-mlp $(DEMO)/checkpoints/step-*/model.safetensors
	$(BIN)/weightatlas --store $(DEMO)/store ls
	$(BIN)/weightatlas --store $(DEMO)/store ls digits-mlp
	$(BIN)/weightatlas --store $(DEMO)/store show digits-mlp
	$(BIN)/weightatlas --store $(DEMO)/store show digits-mlp fc1.weight
	$(BIN)/weightatlas --store $(DEMO)/store verify

lint: $(STAMP)
	$(BIN)/ruff check weightatlas tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache
