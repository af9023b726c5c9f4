# celery-fleet developer commands. `make test` and `make demo` work on a fresh machine:
# they create .venv, install the package, and start a private Redis when none answers.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-fast lint typecheck bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "python3 venv/ensurepip missing; installing python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

## Run the whole test suite against a real Redis (REDIS_URL, else 127.0.0.1:6379, else a private one).
test: venv
	$(PY) -m celery_fleet.testing.redis_server -- $(PY) -m pytest $(PYTEST_ARGS)

## Unit and script tests only (no worker processes, no multi-second properties).
test-fast: venv
	$(PY) -m celery_fleet.testing.redis_server -- $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check celery_fleet tests benchmarks

typecheck: venv
	$(PY) -m pip install --quiet mypy
	$(PY) -m mypy celery_fleet

## Admission micro-benchmark: appends a table to benchmarks/RESULTS.md.
bench: venv
	$(PY) -m celery_fleet.testing.redis_server -- $(PY) benchmarks/admission.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info .pytest-worker-*.log
