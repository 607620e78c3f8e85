"""The bench command: JSON lines on stdout, in a database of its own that it always drops."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.devtools.commands import command_database_exists, own_database_name, run_command

INGEST_KEYS = {
    "benchmark", "events", "requests", "clients", "server", "seconds", "events_per_s",
    "target", "met", "latency_p50_ms", "latency_p95_ms", "rows_verified", "machine",
    "accounts", "open_records", "events_per_record",
}
FILE_IMPORT_KEYS = {
    "benchmark", "events", "seconds", "events_per_s", "floor_seconds", "ratio",
    "phases_seconds", "target_events_per_s", "met", "peak_rss_mb", "target_rss_mb", "rss_met",
    "rows_verified", "machine",
}
AGGREGATION_KEYS = {
    "benchmark", "events", "records", "batches", "bare_seconds", "aggregation_seconds",
    "ratio", "target", "met", "statements_seconds", "units_verified", "machine",
    "store_seconds", "bare_insert_seconds", "store_ratio", "end_to_end_ratio", "scaling",
}

SYNC_KEYS = {
    "benchmark", "records", "batches", "batch_size", "seconds", "records_per_s",
    "bare_seconds", "bare_records_per_s", "ratio", "target_ratio", "met",
    "call_ms_p50", "bare_call_ms_p50", "worker_peak_rss_mb", "worker_peak_pss_mb",
    "target_rss_mb", "rss_met", "billed_once", "machine",
}
REPROCESS_KEYS = {
    "benchmark", "records", "batches", "batch_size", "api_seconds", "api_target_seconds",
    "api_met", "resync_seconds", "resync_records_per_s", "batches_incomplete", "billed_once",
    "machine",
}


@pytest.fixture
def database_name():
    return own_database_name("bench")


def bench(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return run_command("bench", *args, timeout=timeout, grace=60, env=env)


def processes_using(database_name: str) -> list[int]:
    """Return the pids whose environment names the database: what a bench run started."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"/{database_name}".encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def test_it_prints_a_json_line_per_run_and_drops_its_database(database_name):
    run = bench("--events", "2000", "--database-name", database_name, timeout=180)

    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["benchmark"], r.get("clients")) for r in results] == [
        ("ingest_api", 1),
        ("ingest_api", 2),
        ("ingest_api", 1),
        ("ingest_api", 2),
        ("file_import", None),
        ("aggregation", None),
        ("sync_end_to_end", None),
        ("reprocess_all", None),
        ("console_pages", None),
    ]
    for ingest in results[:4]:
        assert INGEST_KEYS <= ingest.keys()
        assert ingest["events"] == ingest["rows_verified"] == 2000
        assert ingest["events_per_record"] == round(2000 / ingest["open_records"], 2)
    # Then over a tenth of the accounts: at full size, about eight events a key.
    assert [ingest["accounts"] for ingest in results[:4]] == [2000, 2000, 200, 200]
    file_import = results[4]
    assert FILE_IMPORT_KEYS <= file_import.keys()
    assert file_import["events"] == file_import["rows_verified"] == 2000
    assert file_import["seconds"] > 0 and file_import["floor_seconds"] > 0
    assert 0 < file_import["peak_rss_mb"] < 1000
    aggregation = results[5]
    assert AGGREGATION_KEYS <= aggregation.keys()
    assert aggregation["events"] == 2000
    assert aggregation["units_verified"] is True
    assert {"adopt", "stage", "insert_batches", "close_records"} <= set(
        aggregation["statements_seconds"]
    )
    # A tenth, three tenths and all of the events, each stored and closed afresh.
    assert [run["events"] for run in aggregation["scaling"]] == [200, 600, 2000]
    assert all(run["end_to_end_us_per_event"] > 0 for run in aggregation["scaling"])
    assert {"cpu_count", "postgresql"} <= results[0]["machine"].keys()
    assert not command_database_exists(database_name)


def test_it_drops_its_database_when_a_benchmark_fails(database_name):
    # A server that takes only small bodies rejects the first real request.
    run = bench(
        "--only", "ingest", "--events", "2000", "--database-name", database_name,
        DATA_UPLOAD_MAX_MEMORY_SIZE="10000",
    )

    assert run.returncode != 0
    assert run.stdout == ""
    assert "ingest answered 413" in run.stderr  # the body is over the limit
    assert not command_database_exists(database_name)


def test_it_syncs_through_a_worker_bills_each_record_once_and_stops_what_it_started(
    database_name,
):
    run = bench("--only", "sync", "--events", "2000", "--database-name", database_name)

    assert run.returncode == 0, run.stderr
    [result] = [json.loads(line) for line in run.stdout.splitlines()]
    assert SYNC_KEYS <= result.keys()
    assert result["benchmark"] == "sync_end_to_end"
    assert (result["records"], result["batches"], result["batch_size"]) == (2000, 2, 1000)
    assert result["billed_once"] is True
    assert result["records_per_s"] > 0 and result["bare_records_per_s"] > 0
    assert result["worker_peak_rss_mb"] >= result["worker_peak_pss_mb"] > 0
    assert not command_database_exists(database_name)
    assert processes_using(database_name) == []


def test_it_reprocesses_all_error_records_and_resyncs_each_once(database_name):
    run = bench("--only", "reprocess", "--records", "2000", "--database-name", database_name)

    assert run.returncode == 0, run.stderr
    [result] = [json.loads(line) for line in run.stdout.splitlines()]
    assert REPROCESS_KEYS <= result.keys()
    assert result["benchmark"] == "reprocess_all"
    assert (result["records"], result["batches"], result["batch_size"]) == (2000, 2, 1000)
    assert result["api_target_seconds"] == 0.2
    assert result["api_met"] is (result["api_seconds"] < 0.2)
    assert result["resync_seconds"] >= result["api_seconds"] > 0
    assert result["queue_seconds"] > 0 and result["bare_update_seconds"] > 0
    assert result["requeue_records_per_s"] > 0
    assert result["requeue_met"] is (result["requeue_records_per_s"] >= 100_000)
    assert result["resync_records_per_s"] > 0
    assert result["batches_incomplete"] == 0
    assert result["billed_once"] is True
    assert "set to ERROR 1009 by one UPDATE" in run.stderr
    assert not command_database_exists(database_name)
    assert processes_using(database_name) == []


CONSOLE_KEYS = {
    "benchmark", "records", "batches", "incomplete_batches", "requests", "pages", "target_ms",
    "met", "machine", "events", "server"}


def test_it_times_the_console_pages(database_name):
    run = bench("--only", "console", "--records", "2000", "--database-name", database_name)
    assert run.returncode == 0, run.stderr
    [result] = [json.loads(line) for line in run.stdout.splitlines()]
    assert set(result) == CONSOLE_KEYS
    assert result["benchmark"] == "console_pages"
    assert (result["records"], result["events"]) == (2000, 20_000)
    assert set(result["pages"]) == {
        "incomplete_batches", "batch_summary", "batch_page", "records_by_batch",
        "records_by_status", "records_by_error_code", "record_page", "event_lookup",
        "trace_search"}
    assert result["target_ms"] == 50.0
    assert all({"p50_ms", "p95_ms"} <= set(p) for p in result["pages"].values())
    assert not command_database_exists(database_name)


def test_it_times_a_file_import_beside_a_bare_copy_of_the_same_rows(database_name):
    run = bench("--only", "file_import", "--events", "3000", "--database-name", database_name)

    assert run.returncode == 0, run.stderr
    [result] = [json.loads(line) for line in run.stdout.splitlines()]
    assert FILE_IMPORT_KEYS <= result.keys()
    assert result["benchmark"] == "file_import"
    assert result["events"] == result["rows_verified"] == 3000
    # Both times are rounded to the millisecond: at this size, a few percent of the ratio.
    assert result["ratio"] == pytest.approx(result["seconds"] / result["floor_seconds"], rel=0.1)
    assert result["met"] is (result["events_per_s"] >= result["target_events_per_s"])
    assert not command_database_exists(database_name)
