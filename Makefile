# One command each: `make demo` sets up and runs the demo, `make test` sets up and runs every check.
# `make test PYTHON=/path/to/python3.13` runs them on that interpreter, in a venv of its own
# (.venv-3.13); a venv whose Python is not the one asked for is made again.
PYTHON ?= python3
PYVERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifeq ($(origin PYTHON),file)
VENV ?= .venv
else
VENV ?= .venv-$(PYVERSION)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(PYVERSION)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The suites that need no browser, no uvicorn processes of their own and no chaos: unit and Redis.
CORE := --ignore=tests/e2e --ignore=tests/browser --ignore=tests/chaos

.PHONY: setup system demo test test-core test-e2e lint typecheck pytest pytest-core clean

$(STAMP): pyproject.toml
	@test -n "$(PYVERSION)" || { echo "make: PYTHON=$(PYTHON) is not a Python that runs here (give e.g. PYTHON=python3 or PYTHON=\$$(pyenv prefix 3.13.0)/bin/python3)" >&2; exit 1; }
	@if [ -x $(BIN)/python ] && [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$(PYVERSION)" ]; then \
		echo "$(VENV) runs another Python than $(PYTHON) ($(PYVERSION)): making it again"; rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

# System packages the tests need (redis-server, node, chromium): installed when
# missing and we may (root with apt-get), else a clear message.
system:
	bash .ci/system-deps

demo: setup
	$(BIN)/python -m example_app

lint: setup
	$(BIN)/ruff check starlette_replay tests example_app
	$(BIN)/ruff format --check starlette_replay tests example_app

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest

pytest-core: setup
	$(BIN)/python -m pytest $(CORE)

test: system setup lint typecheck pytest

# Types and the unit and Redis suites only (CI runs them on every supported Python).
test-core: system setup typecheck pytest-core

# The end-to-end suite (real server processes), e.g. on another Python than `make test`'s.
test-e2e: system setup
	$(BIN)/python -m pytest tests/e2e

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache
