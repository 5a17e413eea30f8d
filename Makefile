# `make test` and `make demo` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-compiles a C++ op on first use (~70 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo lint clean

$(STAMP): pyproject.toml setup.py data_pipeline/_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA, install the CPU build of torch first so nothing pulls the multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev,experiments]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	PY=$(PY) bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs/demo
