"""Benchmarks of the two hot paths: ingest over HTTP and aggregation on PostgreSQL.

`manage.py bench` creates a dedicated database with `bench_database`, runs itself again
with DATABASE_URL pointed at it (so settings, connections and the gunicorn workers all see
that database and nothing else), and drops it afterwards. Each benchmark yields plain
dicts, printed as JSON lines; human notes go to the log (stderr).
"""

from __future__ import annotations

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
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from urllib.parse import quote, urlencode

import environ
import psycopg
import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone
from psycopg import sql
from rest_framework.authtoken.models import Token

from .aggregation import _Sql, aggregate_usage, window_boundary
from .models import AggregatedBatch, AggregationConfig, UsageEvent, UsageRecord

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_NAME = "allegro_bench"
FALLBACK_SERVER_URL = "postgres://postgres@127.0.0.1:5432/postgres"

INGEST_EVENTS = 200_000
INGEST_REQUEST_SIZE = 5_000
INGEST_TARGET_EVENTS_PER_S = 20_000
AGGREGATION_EVENTS = 1_000_000
AGGREGATION_TARGET_RATIO = 1.5
# The generated usage: 2,000 accounts × 5 usage types over 24 hourly windows.
ACCOUNTS = 2_000
USAGE_TYPES = ("API_CALLS", "STORAGE_GB", "EGRESS_GB", "SEATS", "MINUTES")
WINDOWS = 24


class BenchmarkError(Exception):
    """A benchmark could not run or its result failed verification."""


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
) -> Iterator[dict]:
    """POST `events` events in requests of `request_size` to gunicorn, once per client count.

    The bodies are serialized before the clock starts; each run starts from an empty
    event table and ends by checking that every event was stored exactly once.
    """
    bodies = _ingest_bodies(events=events, request_size=request_size)
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe())
    token = Token.objects.create(user=user).key
    with _gunicorn(database_url=database_url, workers=workers) as base_url:
        url = f"{base_url}/api/v1/usage-events/"
        _warm_up(url, token=token, requests_count=4 * workers)
        for clients in client_counts:
            _truncate(UsageEvent)
            started = time.perf_counter()
            latencies, created = _post_concurrently(
                url, token=token, bodies=bodies, clients=clients
            )
            seconds = time.perf_counter() - started
            stored = UsageEvent.objects.count()
            if created != events or stored != events:
                raise BenchmarkError(
                    f"sent {events} events, the API created {created}, the table has {stored}"
                )
            rate = events / seconds
            logger.info("ingest: %d clients, %d workers: %.0f events/s", clients, workers, rate)
            yield {
                "benchmark": "ingest_api",
                "events": events,
                "requests": len(bodies),
                "request_size": request_size,
                "clients": clients,
                "server": f"gunicorn sync, {workers} workers",
                "seconds": round(seconds, 3),
                "events_per_s": round(rate),
                "target": INGEST_TARGET_EVENTS_PER_S,
                "met": rate >= INGEST_TARGET_EVENTS_PER_S,
                "latency_p50_ms": round(_percentile(latencies, 50) * 1000, 1),
                "latency_p95_ms": round(_percentile(latencies, 95) * 1000, 1),
                "rows_verified": stored,
            }


def _ingest_bodies(*, events: int, request_size: int) -> list[bytes]:
    """Return the JSON request bodies: varied accounts, types, times, some qualifiers."""
    start = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    bodies, chunk = [], []
    for n in range(events):
        event = {
            "event_id": f"bench-{n:09d}",
            "client_acct_id": f"ACCT-{n % ACCOUNTS:05d}",
            "usage_type_code": USAGE_TYPES[n // ACCOUNTS % len(USAGE_TYPES)],
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
def _gunicorn(*, database_url: str, workers: int) -> Iterator[str]:
    """Run the app under gunicorn on a free loopback port; yield its base URL."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }
    command = [
        sys.executable, "-m", "gunicorn", "allegro.wsgi",
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
        "--timeout", "300", "--log-level", "warning",
    ]
    server = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_listening(server, port)
        yield base_url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logger.warning("gunicorn (pid %d) ignored SIGTERM; killing it", server.pid)
            server.kill()
            server.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchmarkError(f"gunicorn exited with status {server.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise BenchmarkError("gunicorn did not answer within 60 s")


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


def bench_aggregation(*, events: int = AGGREGATION_EVENTS) -> dict:
    """Aggregate `events` generated events; compare with one bare INSERT … SELECT … GROUP BY.

    The bare statement runs twice (rolled back) and the second, warm-cache run counts: the
    first reads the freshly written table from disk, and aggregate_usage then reads it warm
    too. Each statement of the aggregation run is timed through a Django execute wrapper.
    """
    config = _configure_aggregation()
    now = timezone.now()
    boundary = window_boundary(now=now, frequency=config.frequency, grace=config.lateness_grace)
    _truncate(UsageEvent, UsageRecord, AggregatedBatch)
    seconds_to_generate = _generate_events(
        count=events, start=boundary - WINDOWS * config.frequency
    )
    logger.info("aggregation: generated %d events in %.1f s", events, seconds_to_generate)
    _vacuum_and_checkpoint()

    logger.info(
        "aggregation: the bare INSERT … SELECT runs twice, rolled back, and the second "
        "(warm cache) run counts; aggregate_usage then runs once over the same, warm rows. "
        "commit_and_rest is mostly COMMIT, where PostgreSQL runs the deferred foreign-key "
        "checks (Django creates them DEFERRABLE INITIALLY DEFERRED) of every linked event."
    )
    cold = _time_bare_aggregation(config, boundary=boundary)
    bare = _time_bare_aggregation(config, boundary=boundary)
    logger.info("aggregation: bare INSERT … SELECT %.2f s (cold run %.2f s)", bare, cold)

    timer = _StatementTimer()
    with connection.execute_wrapper(timer):
        started = time.perf_counter()
        result = aggregate_usage(now=now, actor="bench")
        seconds = time.perf_counter() - started
    logger.info(
        "aggregation: aggregate_usage %.2f s; by statement %s",
        seconds, {kind: round(s, 2) for kind, s in timer.seconds.items()},
    )

    _verify_aggregation(result, events=events)
    ratio = seconds / bare
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
        "bare_seconds": round(bare, 3),
        "bare_cold_seconds": round(cold, 3),
        "aggregation_seconds": round(seconds, 3),
        "ratio": round(ratio, 2),
        "target": AGGREGATION_TARGET_RATIO,
        "met": ratio <= AGGREGATION_TARGET_RATIO,
        "statements_seconds": {
            **{kind: round(s, 3) for kind, s in timer.seconds.items()},
            "commit_and_rest": round(seconds - sum(timer.seconds.values()), 3),
        },
        "units_verified": True,
    }


def _configure_aggregation() -> AggregationConfig:
    # Pinned, so a change of the defaults does not silently change what is measured.
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
        },
    )
    return AggregationConfig.load()


def _generate_events(*, count: int, start) -> float:
    """Insert `count` events in one set-based statement; return the seconds it took.

    Accounts cycle fastest, usage types next; times spread over the windows by a stride
    coprime to the day's seconds, so every (account, type, window) group gets events.
    One usage type is priced upstream (amount given); a third carry a qualifier.
    """
    types = "ARRAY[" + ", ".join(f"'{code}'" for code in USAGE_TYPES) + "]"
    span = WINDOWS * 3600
    statement = f"""
        INSERT INTO {UsageEvent._meta.db_table} (
            event_id, client_acct_id, acct_no, usage_type_code, usage_type, usage_units,
            usage_date, amount, rate, qualifier_1, qualifier_2, qualifier_3, qualifier_4,
            comments, received_at)
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
               '', '', '', '', now()
        FROM generate_series(0, %(count)s - 1) AS i
    """
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(statement, {"start": start, "count": count})
    return time.perf_counter() - started


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
    """Time the bare sum: the same rows, window binning and grouping as aggregation's stage.

    It writes into a scratch table inside a transaction that is rolled back.
    """
    statements = _Sql(connection.vendor, config)
    qualifiers = ", ".join(f"{statements.qualifier(n)}" for n in range(1, 5))
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
            SELECT {statements.window_start('usage_date')}, client_acct_id, acct_no,
                   usage_type_code, usage_type, {qualifiers}, rate, amount IS NOT NULL,
                   SUM(usage_units), SUM(amount), COUNT(*)
            FROM {UsageEvent._meta.db_table}
            WHERE record_id IS NULL AND usage_date < %(boundary)s
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
        ("CREATE TEMPORARY TABLE", "stage"),
        (f"INSERT INTO {AggregatedBatch._meta.db_table}", "insert_batches"),
        (f"INSERT INTO {UsageRecord._meta.db_table}", "insert_records"),
        (f"UPDATE {UsageEvent._meta.db_table}", "link_events"),
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


def _truncate(*models) -> None:
    # CASCADE: the bench database is ours, and later models may reference these tables.
    tables = ", ".join(model._meta.db_table for model in models)
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
