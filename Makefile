# Two commands set everything up on a fresh machine:
#   make demo   creates .venv and runs the quickstart pipeline offline on the CPU
#   make test   creates .venv and runs the test suite
# torch is installed first, pinned to the CPU build this machine keeps on disk, so that no
# dependency pulls a multi-GB CUDA build on a machine without a GPU. On a GPU machine set
# TORCH_SPEC (e.g. TORCH_SPEC='torch>=2.11') to take the CUDA build instead.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-gpu lint clean env

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m lmpipeline run examples/quickstart.yaml --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not gpu"

# On the GPU machine (see bench/README.md for the wheel set-up line).
test-gpu:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python3 -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) outputs .pytest_cache
