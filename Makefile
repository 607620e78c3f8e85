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
	$(PY) -m devtools.devstack

## Run the whole test suite (on PostgreSQL: DATABASE_URL, the machine's, or an embedded one).
test: $(STAMP)
	$(PY) -m devtools.with_services $(PY) -m pytest $(PYTEST_ARGS)

## Benchmarks: JSON lines on stdout, in a database of their own.
bench: $(STAMP)
	@$(PY) -m devtools.with_services $(PY) manage.py bench $(BENCH_ARGS)

## Soak: steady ingest with aggregation, sync and console reads alongside for SOAK_SECONDS
## (default 120), then drain and reconcile; JSON lines on stdout.
# Not echoed: the command line would be the first line of stdout.
soak: $(STAMP)
	@$(PY) -m devtools.with_services $(PY) manage.py soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) var
