"""The soak command end to end: real processes, JSON lines, invariants checked."""

import json
import subprocess

import pytest

from tests.devtools.commands import command_database_exists, own_database_name, run_command

pytestmark = pytest.mark.e2e

KEYS = {
    "soak_ingest": {
        "seconds", "target_events_per_s", "events_per_s", "events_sent", "events_distinct",
        "events_stored", "duplicates_answered", "unknown_account_events", "requests",
        "latency_p50_ms", "latency_p95_ms",
    },
    "soak_aggregation": {
        "tasks_sent", "runs", "runs_failed", "records", "batches", "events_unaggregated_at_stop",
    },
    "soak_sync": {
        "records_synced", "records_per_s", "records_by_status", "errors_by_code", "calls",
        "call_ms_p50", "call_ms_p95", "drain_seconds", "worker",
    },
    "soak_console": {"pages"},
    "soak_summary": {
        "seconds", "rate", "drained", "errors", "failed_tasks", "invariants",
        "problems", "ok", "machine",
    },
}


@pytest.fixture
def database_name():
    return own_database_name("soak")


def soak(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return run_command("soak", *args, timeout=timeout, grace=120)


def test_a_short_soak_ingests_syncs_reads_the_console_and_reconciles(database_name):
    run = soak(
        "--seconds", "12", "--rate", "40", "--database-name", database_name, timeout=400
    )

    assert run.returncode == 0, run.stderr[-5000:]
    results = {r["benchmark"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert list(results) == list(KEYS)
    for name, keys in KEYS.items():
        assert keys <= results[name].keys(), name
    ingest, sync = results["soak_ingest"], results["soak_sync"]
    assert ingest["events_per_s"] > 0
    # Re-sent event ids were answered as duplicates and stored once.
    assert ingest["duplicates_answered"] == ingest["events_sent"] - ingest["events_distinct"] > 0
    assert ingest["events_stored"] == ingest["events_distinct"]
    # Unknown accounts made the simulator refuse records: errors are part of the mix.
    assert ingest["unknown_account_events"] > 0
    assert sync["errors_by_code"].get("1009", 0) > 0
    assert sync["records_by_status"].get("COMPLETE", 0) > 0
    assert "PENDING" not in sync["records_by_status"]
    assert sync["records_per_s"] > 0
    assert results["soak_aggregation"]["records"] > 0
    assert all(page["requests"] > 0 for page in results["soak_console"]["pages"].values())
    summary = results["soak_summary"]
    assert summary["ok"] is True
    assert summary["drained"] is True
    assert summary["errors"]["http_5xx"] == 0
    assert summary["failed_tasks"] == {}
    assert summary["invariants"]["ok"] is True, summary["invariants"]["problems"]
    assert summary["invariants"]["checked"]["records_complete"] == (
        sync["records_by_status"]["COMPLETE"]
    )
    assert not command_database_exists(database_name)
