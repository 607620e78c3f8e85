"""The file-import benchmark: `manage.py ingest_usage`'s import of a JSON Lines file beside
its floor, a bare COPY of the same rows (`manage.py bench --only file_import`).

The events have the shape of the aggregation benchmark's (benchmarks._generate_events):
many accounts, five usage types, 24 hourly windows. The file and the floor's COPY text are
written before any clock starts; each timed run starts from an empty table after a
CHECKPOINT, so neither pays for the other's writes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from django.db import connection, transaction
from django.utils import timezone

from usage_sync.events import COLUMNS
from usage_sync.models import AggregatedBatch, UsageEvent, UsageRecord
from usage_sync.usage_files import UsageFile, import_usage_file

from .benchmarks import (
    ACCOUNTS,
    USAGE_TYPES,
    WINDOWS,
    BenchmarkError,
    PhaseListener,
    _no_phase,
    _truncate,
    configure_aggregation,
)

FILE_IMPORT_EVENTS = 1_000_000
FILE_IMPORT_TARGET_EVENTS_PER_S = 60_000
FILE_IMPORT_GOAL_EVENTS_PER_S = 100_000
FILE_IMPORT_TARGET_RSS_MB = 200
_FLOOR_TABLE = "bench_copy_floor"
_NULL = "\\N"


@dataclasses.dataclass(frozen=True)
class _Files:
    jsonl: Path
    copy_text: Path  # the same rows in COPY's text format, for the floor
    units: Decimal  # the sum of usage_units, to verify what was stored


def bench_file_import(
    *, events: int = FILE_IMPORT_EVENTS, on_phase: PhaseListener = _no_phase
) -> dict:
    """Import a JSON Lines file of `events` events with import_usage_file; beside it, COPY
    the same rows into a table like usage_sync_usageevent (its columns and indexes).

    The peak RSS is this process's, reset before the import (/proc/self/clear_refs), so it
    counts the import's memory over what the process held already (`rss_before_mb`).
    """
    configure_aggregation()
    _truncate(UsageEvent, UsageRecord, AggregatedBatch)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="allegro-bench-import-") as directory:
        on_phase(f"writing {events:,} events to a file")
        files = _write_files(Path(directory), events=events)
        size_mb = files.jsonl.stat().st_size / 2**20
        on_phase("bare COPY")
        floor = _time_bare_copy(files.copy_text, events=events)
        on_phase("import_usage_file")
        run = _time_import(files.jsonl)
    load_after = os.getloadavg()[0]
    _verify(run["result"], events=events, units=files.units)
    seconds = run["seconds"]
    rate = events / seconds
    return {
        "benchmark": "file_import",
        "events": events,
        "format": "jsonl",
        "file_mb": round(size_mb, 1),
        "seconds": round(seconds, 3),
        "events_per_s": round(rate),
        "floor_seconds": round(floor, 3),
        "floor": "bare COPY of the same rows into (LIKE usage_sync_usageevent INCLUDING ALL)",
        "ratio": round(seconds / floor, 2),
        "phases_seconds": run["phases"],
        "target_events_per_s": FILE_IMPORT_TARGET_EVENTS_PER_S,
        "goal_events_per_s": FILE_IMPORT_GOAL_EVENTS_PER_S,
        "met": rate >= FILE_IMPORT_TARGET_EVENTS_PER_S,
        "peak_rss_mb": run["peak_rss_mb"],
        "rss_before_mb": run["rss_before_mb"],
        "target_rss_mb": FILE_IMPORT_TARGET_RSS_MB,
        "rss_met": run["peak_rss_mb"] < FILE_IMPORT_TARGET_RSS_MB,
        "rows_verified": events,
        # Other work on the machine skews both figures alike; the ratio less so.
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
    }


def _write_files(directory: Path, *, events: int) -> _Files:
    """Write the events as JSON Lines (units as JSON numbers, amounts as strings, as
    exports come) and the same rows as COPY text; nothing is held in memory."""
    start = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(
        hours=WINDOWS + 1
    )
    span = WINDOWS * 3600
    # The stride coprime to the day's seconds spreads events over every window.
    dates = [(start + timedelta(seconds=s)).isoformat() for s in range(span)]
    received = timezone.now().isoformat()
    jsonl, copy_text = directory / "usage.jsonl", directory / "usage.copy"
    total_quarters = 0
    with jsonl.open("w") as events_file, copy_text.open("w") as rows_file:
        for i in range(events):
            quarters = i % 97 + 1
            total_quarters += quarters
            units = str(Decimal(quarters) / 4)
            account = f"ACCT-{i % ACCOUNTS:05d}"
            kind = i // ACCOUNTS % len(USAGE_TYPES)
            date = dates[i * 7919 % span]
            qualifier = "eu-west" if i % 3 == 0 else "us-east"
            # One usage type is priced upstream, as in the aggregation benchmark.
            amount = f"{quarters * 5 // 2 / 100:.2f}" if kind == 1 else None
            priced = f', "amount": "{amount}"' if amount else ""
            events_file.write(
                f'{{"event_id": "gen-{i}", "client_acct_id": "{account}", '
                f'"usage_type_code": "{USAGE_TYPES[kind]}", "usage_units": {units}, '
                f'"usage_date": "{date}", "qualifier_1": "{qualifier}"{priced}}}\n'
            )
            rows_file.write("\t".join((
                f"gen-{i}", account, _NULL, USAGE_TYPES[kind], _NULL, units, date,
                amount or _NULL, _NULL, qualifier, "", "", "", "", received,
            )) + "\n")
    return _Files(jsonl, copy_text, Decimal(total_quarters) / 4)


def _checkpoint() -> None:
    # The previous phase's dirty pages are written out here, not on the next one's clock.
    with connection.cursor() as cursor:
        cursor.execute("CHECKPOINT")


def _time_bare_copy(path: Path, *, events: int) -> float:
    """COPY the prepared rows into a table like usage_sync_usageevent, in one transaction
    (commit included, as the import's); return the seconds it took."""
    table = UsageEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {_FLOOR_TABLE} (LIKE {table} INCLUDING ALL)")
    try:
        _checkpoint()
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor, path.open("rb") as rows:
            columns = ", ".join((*COLUMNS, "received_at"))
            with cursor.copy(f"COPY {_FLOOR_TABLE} ({columns}) FROM STDIN") as copy:
                while block := rows.read(1 << 20):
                    copy.write(block)
        seconds = time.perf_counter() - started
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM {_FLOOR_TABLE}")
            copied = cursor.fetchone()[0]
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {_FLOOR_TABLE}")
    if copied != events:
        raise BenchmarkError(f"file import: the bare COPY stored {copied} rows of {events}")
    return seconds


def _time_import(path: Path) -> dict:
    """Run import_usage_file on the file; time it, its statements and its peak RSS."""
    _checkpoint()
    statements: dict[str, float] = defaultdict(float)

    def timed(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            statements[sql.split(None, 1)[0].upper()] += time.perf_counter() - started

    read = {}

    def progress(_bytes: int) -> None:
        # The last call comes when the last line has been read, validated and copied.
        read["at"] = time.perf_counter()

    with path.open("rb") as source:
        usage_file = UsageFile(source, format="jsonl")
        peak_reset = _reset_peak_rss()
        rss_before = _status_mb("VmRSS")
        with connection.execute_wrapper(timed):
            started = time.perf_counter()
            result = import_usage_file(usage_file, progress=progress)
            seconds = time.perf_counter() - started
        peak = _status_mb("VmHWM")
    if not peak_reset:
        # Then VmHWM is the process's peak over its whole life so far: an upper bound.
        peak = max(peak, rss_before)
    reading = read["at"] - started
    store = sum(statements.values())
    return {
        "result": result,
        "seconds": seconds,
        "phases": {
            "read_validate_copy": round(reading, 3),
            "statements": {kind: round(s, 3) for kind, s in statements.items()},
            "commit_and_rest": round(seconds - reading - store, 3),
        },
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(rss_before, 1),
    }


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_mb(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkError(f"/proc/self/status has no {name}")


def _verify(result, *, events: int, units: Decimal) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*), COALESCE(SUM(usage_units), 0) FROM {UsageEvent._meta.db_table}"
        )
        stored, stored_units = cursor.fetchone()
    if (result.events, result.created, stored) != (events, events, events) or (
        Decimal(stored_units) != units
    ):
        raise BenchmarkError(
            f"file import: {events} events with {units} units written; the import read "
            f"{result.events} and created {result.created}; the table has {stored} events "
            f"with {stored_units} units"
        )
