# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv if missing, installs what
# is missing (Python packages, the Debian Fashion-MNIST package, Chromium for the browser test), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VMEM := $(VENV)/bin/vmem
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-fast install data browser clean bench

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; without it, the torch range in
# pyproject.toml would pull a multi-GB CUDA build. On GPU machines install your CUDA torch beforehand.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

data:
	@bash scripts/ensure_system_deps.sh fashion-mnist

browser:
	@bash scripts/ensure_system_deps.sh chromium

demo: install data
	$(VMEM) demo

test: install data browser
	$(PY) -m pytest

test-fast: install data
	$(PY) -m pytest -m "not slow and not browser"

bench: install data
	$(PY) benchmarks/embed_throughput.py

clean:
	rm -rf work
