"""The bench command: JSON lines on stdout, in a database of its own that it always drops."""

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from django.conf import settings

from usage_sync.benchmarks import database_exists, server_settings

pytestmark = pytest.mark.postgres

INGEST_KEYS = {
    "benchmark", "events", "requests", "clients", "server", "seconds", "events_per_s",
    "target", "met", "latency_p50_ms", "latency_p95_ms", "rows_verified", "machine",
}
AGGREGATION_KEYS = {
    "benchmark", "events", "records", "batches", "bare_seconds", "aggregation_seconds",
    "ratio", "target", "met", "statements_seconds", "units_verified", "machine",
}


@pytest.fixture
def database_name():
    """Name a bench database of this test's own, so a real `make bench` is left alone."""
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("needs PostgreSQL (set DATABASE_URL)")
    return f"allegro_bench_test_{uuid.uuid4().hex[:12]}"


def bench(*args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "manage.py", "bench", *args]
    process = subprocess.Popen(
        command,
        cwd=settings.BASE_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.terminate()  # the command stops its gunicorn and drops its database
        try:
            process.communicate(timeout=60)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("bench did not finish within 120 s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def bench_database_exists(name: str) -> bool:
    return database_exists(name=name, server=server_settings(settings.DATABASES["default"]))


def test_it_prints_a_json_line_per_run_and_drops_its_database(database_name):
    run = bench("--events", "2000", "--database-name", database_name)

    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["benchmark"], r.get("clients")) for r in results] == [
        ("ingest_api", 1),
        ("ingest_api", 2),
        ("aggregation", None),
    ]
    for ingest in results[:2]:
        assert INGEST_KEYS <= ingest.keys()
        assert ingest["events"] == ingest["rows_verified"] == 2000
    aggregation = results[2]
    assert AGGREGATION_KEYS <= aggregation.keys()
    assert aggregation["events"] == 2000
    assert aggregation["units_verified"] is True
    assert {"stage", "insert_batches", "insert_records", "link_events"} <= set(
        aggregation["statements_seconds"]
    )
    assert {"cpu_count", "postgresql"} <= results[0]["machine"].keys()
    assert not bench_database_exists(database_name)


def test_it_drops_its_database_when_a_benchmark_fails(database_name):
    # A server that takes only small bodies rejects the first real request.
    run = bench(
        "--only", "ingest", "--events", "2000", "--database-name", database_name,
        DATA_UPLOAD_MAX_MEMORY_SIZE="10000",
    )

    assert run.returncode != 0
    assert run.stdout == ""
    assert "ingest answered 400" in run.stderr
    assert not bench_database_exists(database_name)
