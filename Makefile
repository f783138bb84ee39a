# Verbs: make install | make test | make lint | make bench | make demo
# Everything runs from the project virtualenv (.venv) and the npm packages in node_modules.

VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test test-js lint bench

install: $(VENV)/.install-stamp node_modules/.package-lock.json

$(BIN)/python:
	python3 -m venv $(VENV)

# Reinstall when the dependencies change (pyproject.toml newer than the last install).
$(VENV)/.install-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	touch $@

# npm ci writes node_modules/.package-lock.json: redo it when the lock file is newer.
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

test: install test-js
	scripts/ensure_services.sh
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

# The browser client kit (clients/js): Node's own test runner, no npm packages needed.
test-js:
	node --test clients/js/test/

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The pharmacy example end to end: soketi, a Celery worker and beat, the app, websocket
# subscribers; prints "delivered N/N events (...)" and exits non-zero unless all arrived intact.
# SERVE=1 (or DEMO_ARGS=--serve) keeps serving the pharmacists' page until Ctrl-C instead.
.PHONY: demo
DEMO_ARGS ?=
SERVE ?=
demo: install
	$(BIN)/python -m examples.pharmacy.demo $(if $(SERVE),--serve) $(DEMO_ARGS)

# Benchmark suite against the real services (docs/benchmarks.md). BENCH_ARGS=--quick for a
# two-minute run; --json for machines; --only to pick scenarios.
bench: install
	scripts/ensure_services.sh
	$(BIN)/python -m bench $(BENCH_ARGS)
