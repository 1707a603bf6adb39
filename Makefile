# weightatlas: `make demo` and `make test` work on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo_out

.PHONY: install browser demo test lint typecheck unit bench clean

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

# The HTML report is tested in a real headless browser: Debian's chromium. Installed
# here when missing and this is a root shell with apt (as on CI); elsewhere the
# browser tests say they skip because chromium is absent.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed: the browser tests will skip"; fi; }

# Train a small network on scikit-learn's digits, save it as safetensors at three
# training steps, ingest them into a store, show what the store holds, compare two
# steps, and write the offline HTML report. Then ingest the final model as ONNX and run
# it from the store: integrated gradients on one digit per class, the weights'
# gradients as a snapshot, and the expanded weights from the image to each class.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/python -m weightatlas._demo $(DEMO)
	$(BIN)/weightatlas --store $(DEMO)/store ingest --model digits-mlp $(DEMO)/checkpoints/step-*/model.safetensors
	$(BIN)/weightatlas --store $(DEMO)/store ls
	$(BIN)/weightatlas --store $(DEMO)/store ls digits-mlp
	$(BIN)/weightatlas --store $(DEMO)/store show digits-mlp
	$(BIN)/weightatlas --store $(DEMO)/store show digits-mlp fc1.weight
	$(BIN)/weightatlas --store $(DEMO)/store verify
	$(BIN)/weightatlas --store $(DEMO)/store compare digits-mlp@1 digits-mlp@60
	$(BIN)/weightatlas --store $(DEMO)/store plot heatmap digits-mlp fc1.weight -o $(DEMO)/fc1.svg
	$(BIN)/weightatlas --store $(DEMO)/store report digits-mlp -o $(DEMO)/report.html
	$(BIN)/weightatlas --store $(DEMO)/store ingest --model digits-onnx $(DEMO)/digits-mlp.onnx
	$(BIN)/weightatlas --store $(DEMO)/store saliency digits-onnx -i $(DEMO)/digits.npy --method ig -o $(DEMO)/saliency.png
	$(BIN)/weightatlas --store $(DEMO)/store gradients digits-onnx -i $(DEMO)/digits.npy --target 0,1,2,3,4,5,6,7,8,9 --loss cross_entropy
	$(BIN)/weightatlas --store $(DEMO)/store expand digits-onnx x fc3 --channels 0,1,2,3,4,5,6,7,8,9 --top 1 -o $(DEMO)/expanded.png
	@echo "report: $(DEMO)/report.html (open it in a browser; it works offline)"
	@echo "charts: $(DEMO)/saliency.png, $(DEMO)/expanded.png"

lint: $(STAMP)
	$(BIN)/ruff check weightatlas tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) browser
	$(BIN)/python -m pytest -n 2 --durations=15

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/charts.py
	$(BIN)/python bench/analyses.py
	$(BIN)/python bench/track.py
	$(BIN)/python bench/saliency.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache
