# Verbs: make install | make test | make lint | make demo
# Everything runs from the project virtualenv (.venv) and the npm packages in node_modules.

VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install test lint

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

test: install
	scripts/ensure_services.sh
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The pharmacy example end to end: soketi, a Celery worker and beat, the app, websocket
# subscribers; prints "delivered N/N events (...)" and exits non-zero unless all arrived intact.
.PHONY: demo
DEMO_ARGS ?=
demo: install
	$(BIN)/python -m examples.pharmacy.demo $(DEMO_ARGS)
