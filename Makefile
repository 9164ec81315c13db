# make demo : create .venv, install, run the tiny pretrain -> SFT -> DPO -> export pipeline (CPU)
# make test : create .venv, install (with test extras, llama-cpp-python and a transformers 4.57
#             tree for one test), run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch 2.13.0 is what this machine (and CI) installs; with a GPU present pip
# resolves torch from the pyproject range instead.
TORCH_CPU := torch==2.13.0

.PHONY: demo test lint gpu-test clean install

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "no GPU: installing the CPU build $(TORCH_CPU) first"; \
	  $(PIP) install -q $(TORCH_CPU); fi
	$(PIP) install -q -e ".[dev,test]"
	@# llama-models ships the real LLaMA-3 tokenizer ranks; its own requirements pull a CUDA
	@# torch, so it is installed without them (used by one tokenizer integration test).
	$(PIP) install -q --no-deps llama-models
	touch $(STAMP)

# llama-cpp-python compiles llama.cpp (about 4.5 minutes on 2 cores; pip caches the wheel).
$(VENV)/.engines: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -e ".[engines]" || \
	  echo "llama-cpp-python did not build: the llama.cpp parity test will be skipped"
	touch $(VENV)/.engines

# transformers 4.57 beside the venv's 5.x, for the test that loads our exports with 4.x
# (tests/export/test_transformers4.py runs it in a second process with this tree first on its
# path). Only the three packages whose versions differ; the rest comes from the venv.
TRANSFORMERS4 := $(VENV)/transformers-4.57
$(TRANSFORMERS4)/.installed: | $(PY)
	$(PIP) install -q --no-deps --target $(TRANSFORMERS4) "transformers==4.57.6" \
	  "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) $(VENV)/.engines $(TRANSFORMERS4)/.installed
	$(VENV)/bin/ruff check bitnet_train scripts tests train.py
	WANDB_MODE=offline HF_HUB_OFFLINE=1 BITNET_TRANSFORMERS4_DIR=$(abspath $(TRANSFORMERS4)) \
	  $(VENV)/bin/pytest -q -ra --durations=15

gpu-test: $(STAMP)
	$(VENV)/bin/pytest -q -m gpu -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check bitnet_train scripts tests train.py

clean:
	rm -rf $(VENV) demo_out outputs .pytest_cache
