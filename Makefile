# Allegro Usage Sync — the README's commands.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOAK_SECONDS ?= 120

.PHONY: run test bench soak lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## Start the whole stack on embedded defaults (Ctrl-C stops everything).
run: $(STAMP)
	$(PY) -m allegro.devstack

## Run the whole test suite.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Benchmarks: JSON lines on stdout (needs PostgreSQL; see README).
bench: $(STAMP)
	$(PY) manage.py bench

## Soak: steady ingest with aggregation, sync and console reads alongside for SOAK_SECONDS
## (default 120), then drain and reconcile; JSON lines on stdout (needs PostgreSQL, Redis).
# Not echoed: the command line would be the first line of stdout.
soak: $(STAMP)
	@$(PY) manage.py soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) db.sqlite3 var
