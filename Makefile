# Two commands on a fresh machine: `make demo` and `make test` (both create the venv on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Not -q: a first install takes minutes and should show what it is doing (PIP_FLAGS=-q to silence it).
PIP_FLAGS ?= --disable-pip-version-check --progress-bar on

.PHONY: setup test test-fast lint demo bench lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "== creating $(VENV) and installing quantpipe (pinned by constraints.txt; a few minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== 1/2 torch 2.13.0 (CPU wheel)"
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt torch==2.13.0
	@echo "== 2/2 quantpipe and its dependencies (prefect, mlflow, transformers, ...)"
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev,dask]"
	touch $@

## All tests CI can afford (unit, property, integration, end-to-end; ~10 min on 2 cores).
test: setup
	$(PY) -m pytest -q

## Unit tests only (skips the slow end-to-end ones).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy quant kernels infra

demo: setup
	$(VENV)/bin/quantpipe demo

lock: setup
	(echo "# Lock of every package CI installs (pip freeze of a clean install, torch = the local CPU wheel)."; \
	 echo "# Regenerate: make lock"; \
	 $(PY) -m pip freeze --exclude-editable | grep -iv '^quantpipe' | sed 's/+cpu//') > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
