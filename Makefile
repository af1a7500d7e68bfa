# Set-up, demo, tests and benchmarks. Every target creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qpeft-installed
# vLLM's own checkpoint reader, for the engine tests only: installed with --no-deps into a
# folder beside the venv (its wheel would replace torch), never imported by qpeft.
VLLM_READER := $(VENV)/vllm-reader
VLLM_REQS := tests/checkpoint/vllm_reader.txt
VLLM_STAMP := $(VLLM_READER)/.installed

.PHONY: demo test lint bench venv vllm-reader clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,demo,bench]"
	touch $(STAMP)

vllm-reader: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_REQS) $(STAMP)
	rm -rf $(VLLM_READER)
	$(PY) -m pip install -q --no-deps --target $(VLLM_READER) -r $(VLLM_REQS)
	touch $(VLLM_STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m qpeft recover --output runs/recover

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint $(VLLM_STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
