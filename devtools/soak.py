"""Soak: steady ingest while aggregation, sync and console reads run alongside, then a
drain and the invariants.

`manage.py soak` creates a dedicated database (as `manage.py bench` does), starts tansu,
the core Aria simulator, gunicorn and one Celery worker as real processes on loopback,
and for `seconds`:

- ingest: INGEST_CLIENTS threads POST `rate` events/s to the API, REQUEST_SIZE a request,
  each request on its own schedule (a client that falls behind sends at once and counts
  as late). One event in UNKNOWN_EVERY names an account the simulator does not know (its
  record ends ERROR 1009); one slot in DUPLICATE_EVERY re-sends an earlier event, and one
  request in RETRY_EVERY is sent twice, as a client retrying after a lost answer.
  Usage dates fall in the half hour of windows closed when the event was due, so every
  aggregation run finds work and late events keep making new batches of old windows;
- aggregation: this process plays an impatient beat. The configuration is pinned to
  5-minute windows without a lateness grace, and every AGGREGATE_EVERY seconds it marks a
  run due (last_run_at cleared) and sends usage_sync.tasks.aggregate_usage_if_due to the
  worker, which aggregates and publishes the new batch ids; the sweep
  (publish_due_batches) and the consumer restart go out as beat would send them;
- sync: the worker's consumers take the batch ids from tansu and call the simulator;
- console: a session logged in over HTTP fetches the incomplete batches, one batch's error
  summary, the records list and the activity log in turn, every CONSOLE_EVERY seconds.

Then the drain: ingest and console reads stop, the beat goes on until every event is
aggregated and no record is PENDING, and a last aggregation run in this process must
find nothing left. `reconcile` then checks events, records, batches and what the
simulator holds. Results are plain dicts (JSON lines); human notes go to the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import requests
from celery import Celery
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Count, Sum
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token

from allegro.progress import progress
from usage_sync.aggregation import aggregate_usage, window_boundary
from usage_sync.billing import AriaClient
from usage_sync.models import (
    AggregatedBatch,
    AggregationConfig,
    RecordStatus,
    SyncActivity,
    UsageEvent,
    UsageRecord,
)
from usage_sync.reconcile import reconcile

from .benchmarks import (
    USAGE_TYPES,
    BenchmarkError,
    _gunicorn,
    _log_tails,
    _percentile,
    _simulator,
    _sync_worker,
    _tansu,
    _TreeMemory,
    bench_redis_url,
    configure_aggregation,
    machine_facts,
)

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_NAME = "allegro_soak"
DEFAULT_SECONDS = 120
# The 2-core development machine keeps this pace with everything on it (see README).
DEFAULT_RATE = 500
REQUEST_SIZE = 20
INGEST_CLIENTS = 2
# Accounts the simulator knows × 5 usage types × 6 windows: up to 3,000 records a run.
KNOWN_ACCOUNTS = tuple(f"SOAK-{n:03d}" for n in range(100))
UNKNOWN_EVERY = 20
UNKNOWN_ACCOUNTS = ("SOAK-UNKNOWN-0", "SOAK-UNKNOWN-1", "SOAK-UNKNOWN-2")
DUPLICATE_EVERY = 10
# A re-sent event comes from three requests back (so another client may still be sending
# it); the lag is not a multiple of DUPLICATE_EVERY, so it names an event that was sent.
DUPLICATE_LAG = 3 * REQUEST_SIZE + 3
RETRY_EVERY = 25
USAGE_SPAN_SECONDS = 1800
AGGREGATE_EVERY = 5.0
SWEEP_EVERY = 5.0
CONSOLE_EVERY = 0.5
DRAIN_TIMEOUT = 300.0
# A request this much after its slot counts as late: the client could not keep the rate.
LATE_AFTER = 1.0
# The soak's Celery broker database: other runs' workers never see its tasks.
SOAK_REDIS_DB = 11
AGGREGATE_TASK = "usage_sync.tasks.aggregate_usage_if_due"
SWEEP_TASK = "usage_sync.tasks.publish_due_batches"
CONSOLE_PAGES = ("incomplete_batches", "batch_error_summary", "records", "activity")

assert DUPLICATE_LAG % DUPLICATE_EVERY and DUPLICATE_LAG >= REQUEST_SIZE


def soak(
    *, database_url: str, seconds: float = DEFAULT_SECONDS, rate: float = DEFAULT_RATE,
    logs: Path | None = None, restart_worker_at: float | None = None,
):
    """Run the soak; return its result dicts, the last a summary with `ok`.

    `ok` is false when an invariant fails, the pipeline did not drain, a worker task
    failed, or any request failed (HTTP 5xx, another unexpected status, or no answer).
    With `restart_worker_at`, the worker is stopped (SIGTERM) and started again that many
    seconds into the load.
    The processes' logs go to `logs` when given (kept), else to a temporary directory.
    """
    machine = machine_facts()
    # The shortest windows and no grace: windows close while the soak runs.
    config = configure_aggregation(frequency_minutes=AggregationConfig.Frequency.MIN_5,
                                   lateness_grace_minutes=0, last_run_at=None)
    token = _ingest_token()
    operator = _operator()
    errors = _Errors()
    with contextlib.ExitStack() as stack:
        if logs is None:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="allegro-soak-")))
        else:
            logs.mkdir(parents=True, exist_ok=True)
        try:
            with _tansu(log=logs / "tansu.log") as bootstrap, _simulator(
                log=logs / "simulator.log", accounts=KNOWN_ACCOUNTS
            ) as simulator:
                aria_url = f"{simulator}/v1/core"
                with _sync_worker(
                    database_url=database_url, bootstrap=bootstrap, aria_url=aria_url,
                    logs=logs, redis_db=SOAK_REDIS_DB,
                ) as (worker, _join_seconds, idle):
                    # Inside the block the settings name this run's topic; the worker's
                    # queue has the topic's name.
                    queue = settings.KAFKA_AGGREGATED_TOPIC
                    web_env = {
                        "REDIS_URL": bench_redis_url(db=SOAK_REDIS_DB),
                        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                        "KAFKA_AGGREGATED_TOPIC": queue,
                        "ARIA_API_URL": aria_url,
                    }
                    with _gunicorn(
                        database_url=database_url, workers=2, extra_env=web_env
                    ) as base_url, _TreeMemory(worker.pid, interval=1.0) as memory:
                        run = _run(
                            base_url=base_url, token=token, operator=operator, queue=queue,
                            config=config, seconds=seconds, rate=rate, errors=errors,
                            worker=worker, restart_at=restart_worker_at,
                        )
                    worker_memory = {
                        "idle_rss_mb": round(idle.peak_rss_kb / 1024, 1),
                        "peak_rss_mb": round(memory.peak_rss_kb / 1024, 1),
                        "peak_pss_mb": round(memory.peak_pss_kb / 1024, 1),
                    }
                report = reconcile(client=AriaClient(url=aria_url))
        except BenchmarkError as exc:
            raise BenchmarkError(f"{exc}\n{_log_tails(logs)}") from exc
        worker_log = _WorkerLog((logs / "worker.log").read_text(errors="replace"))
    return _results(
        run=run, report=report, errors=errors, seconds=seconds, rate=rate,
        worker_memory=worker_memory, worker_log=worker_log, machine=machine,
    )


def _run(*, base_url, token, operator, queue, config, seconds, rate, errors, worker,
         restart_at=None) -> dict:
    """Ingest, beat and console reads for `seconds`, then the drain; return the numbers."""
    app = Celery("allegro-soak", broker=bench_redis_url(db=SOAK_REDIS_DB), set_as_current=False)
    beat = _Beat(app, queue=queue)
    plan = _Plan(
        started_at=timezone.now(), rate=rate, frequency=config.frequency,
        tag=secrets.token_hex(3),
    )
    ingest = _Ingest(
        url=f"{base_url}/api/v1/usage-events/", token=token, plan=plan, errors=errors
    )
    console = _Console(base_url, errors=errors)
    console.log_in(*operator)
    restart = None
    try:
        started = time.monotonic()
        ingest.start()
        console.start()
        with progress("Soak", total=int(seconds), unit="s") as advance:
            shown = 0
            while (elapsed := time.monotonic() - started) < seconds:
                beat.tick()
                if restart is None and restart_at is not None and elapsed >= restart_at:
                    restart = {"at": time.time()}
                    worker.restart()  # SIGTERM: a warm shutdown, then a new worker
                    restart["seconds"] = time.time() - restart["at"]
                if worker.poll() is not None:
                    raise BenchmarkError(f"the celery worker exited with {worker.returncode}")
                time.sleep(min(1.0, seconds - elapsed))
                now = min(int(time.monotonic() - started), int(seconds))
                advance(now - shown, note=_progress_note(ingest))
                shown = now
        ingest.stop()
        console.stop()
        ingest_seconds = ingest.seconds()
        # What aggregation had not caught up with when the load stopped: the events of
        # records still OPEN (every soak event is dated in a window closed when sent).
        unaggregated = _events_in_open_records()
        drain_started = time.monotonic()
        drained = _drain(beat, worker=worker)
        drain_seconds = time.monotonic() - drain_started
    finally:
        ingest.stop()
        console.stop()
        app.close()
    # The last run: nothing may be left, and reconcile then checks every event received.
    final = aggregate_usage(now=timezone.now(), actor="soak")
    return {
        "ingest": ingest,
        "console": console,
        "beat": beat,
        "ingest_seconds": ingest_seconds,
        "unaggregated_at_stop": unaggregated,
        "drained": drained and final.events == 0,
        "final_run_events": final.events,
        "drain_seconds": drain_seconds,
        "run_seconds": time.monotonic() - started,
        "restart": restart,
    }


def _progress_note(ingest: _Ingest) -> str:
    pending = UsageRecord.objects.filter(status=RecordStatus.PENDING).count()
    records = UsageRecord.objects.count()
    return f"{ingest.received} events in, {records} records, {pending} pending"


def _events_in_open_records() -> int:
    return UsageRecord.objects.filter(batch__isnull=True).aggregate(
        n=Sum("event_count")
    )["n"] or 0


def _drain(beat: _Beat, *, worker) -> bool:
    """Keep the beat going until every event is in a batch and no record is PENDING."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    beat.hurry()  # the last events should not wait out the period
    with progress("Drain", unit=" check") as advance:
        while time.monotonic() < deadline:
            unlinked = _events_in_open_records()
            pending = UsageRecord.objects.filter(status=RecordStatus.PENDING).count()
            if not unlinked and not pending:
                return True
            if worker.poll() is not None:
                raise BenchmarkError(f"the celery worker exited with {worker.returncode}")
            advance(1, note=f"{unlinked} events to aggregate, {pending} records pending")
            beat.tick()
            time.sleep(0.5)
    logger.error("the pipeline did not drain within %.0f s", DRAIN_TIMEOUT)
    return False


# --- the parts that run alongside --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The events, each a pure function of its number, so a re-send is the same body."""

    started_at: datetime
    rate: float
    frequency: timedelta
    tag: str

    def event(self, n: int) -> dict:
        # Dated in a window closed when the event was due, so the next run aggregates it.
        due = self.started_at + timedelta(seconds=n / self.rate)
        boundary = window_boundary(now=due, frequency=self.frequency, grace=timedelta(0))
        usage_type = USAGE_TYPES[n // 7 % len(USAGE_TYPES)]
        if n % UNKNOWN_EVERY == UNKNOWN_EVERY // 2:
            account = UNKNOWN_ACCOUNTS[n // UNKNOWN_EVERY % len(UNKNOWN_ACCOUNTS)]
        else:
            # n // 2: every account gets events, though some slots carry re-sends.
            account = KNOWN_ACCOUNTS[n // 2 % len(KNOWN_ACCOUNTS)]
        event = {
            "event_id": f"soak-{self.tag}-{n:09d}",
            "client_acct_id": account,
            "usage_type_code": usage_type,
            "usage_units": f"{n % 97 + 1}.25",
            "usage_date": (
                boundary - timedelta(seconds=1 + n * 7919 % USAGE_SPAN_SECONDS)
            ).isoformat(),
        }
        if usage_type == USAGE_TYPES[1]:  # priced upstream
            event["amount"] = f"{(n % 97 + 1) * 0.025:.2f}"
        return event

    def request(self, k: int) -> tuple[bytes, list[int]]:
        """Return request k's body and the numbers of the events in it."""
        numbers = []
        for n in range(k * REQUEST_SIZE, (k + 1) * REQUEST_SIZE):
            if n % DUPLICATE_EVERY == DUPLICATE_EVERY - 1 and n >= DUPLICATE_LAG:
                numbers.append(n - DUPLICATE_LAG)
            else:
                numbers.append(n)
        return json.dumps([self.event(n) for n in numbers]).encode(), numbers


class _Errors:
    """Unexpected answers, by source and HTTP status ("no answer" when none came)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: list[str] = []

    def add(self, source: str, status: str, detail: str) -> None:
        with self._lock:
            self.counts[source, status] += 1
            if len(self.examples) < 5:
                self.examples.append(f"{source}: {status}: {detail[:300]}")
        logger.warning("%s: %s: %s", source, status, detail[:300])

    def summary(self) -> dict:
        with self._lock:
            five_xx = sum(n for (_, status), n in self.counts.items() if status.startswith("5"))
            return {
                "http_5xx": five_xx,
                "other": sum(self.counts.values()) - five_xx,
                "by_source_and_status": {
                    f"{source} {status}": n for (source, status), n in sorted(self.counts.items())
                },
                "examples": list(self.examples),
            }


class _Ingest:
    """INGEST_CLIENTS threads POSTing the plan's requests on schedule."""

    def __init__(self, *, url: str, token: str, plan: _Plan, errors: _Errors):
        self.url, self.token, self.plan, self.errors = url, token, plan, errors
        self.latencies: list[float] = []
        self.requests = self.received = self.created = self.duplicates = 0
        self.late = 0
        self.max_lag = 0.0
        self.sent: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = self._finished = 0.0
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"soak-ingest-{i}", daemon=True)
            for i in range(INGEST_CLIENTS)
        ]

    def start(self) -> None:
        self._started = self._finished = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def seconds(self) -> float:
        """From the first request's slot to the last answer."""
        return self._finished - self._started

    def _client(self, index: int) -> None:
        interval = REQUEST_SIZE / self.plan.rate
        with requests.Session() as session:
            session.headers.update(
                {"Authorization": f"Token {self.token}", "Content-Type": "application/json"}
            )
            k = index
            while not self._stop.is_set():
                lag = time.monotonic() - (self._started + k * interval)
                if lag < 0 and self._stop.wait(-lag):
                    break
                body, numbers = self.plan.request(k)
                self._post(session, body, numbers, lag=max(0.0, lag))
                if k % RETRY_EVERY == RETRY_EVERY - 1:
                    self._post(session, body, numbers, lag=0.0)
                k += INGEST_CLIENTS

    def _post(self, session: requests.Session, body: bytes, numbers: list[int], *, lag):
        started = time.monotonic()
        try:
            answer = session.post(self.url, data=body, timeout=60)
        except requests.RequestException as exc:
            self.errors.add("ingest", "no answer", repr(exc))
            return
        finished = time.monotonic()
        if answer.status_code != 201:
            self.errors.add("ingest", str(answer.status_code), answer.text)
            return
        result = answer.json()
        with self._lock:
            self.latencies.append(finished - started)
            self.requests += 1
            self.received += result["received"]
            self.created += result["created"]
            self.duplicates += result["duplicates"]
            self.sent.update(numbers)
            self.late += lag > LATE_AFTER
            self.max_lag = max(self.max_lag, lag)
            self._finished = max(self._finished, finished)


class _Console:
    """A session logged in over HTTP reading the console's main pages in turn."""

    def __init__(self, base_url: str, *, errors: _Errors):
        self.base_url, self.errors = base_url, errors
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.session = requests.Session()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="soak-console", daemon=True)

    def log_in(self, username: str, password: str) -> None:
        url = f"{self.base_url}{reverse('login')}"
        self.session.get(url, timeout=60).raise_for_status()
        answer = self.session.post(
            url,
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": self.session.cookies.get("csrftoken", ""),
            },
            allow_redirects=False,
            timeout=60,
        )
        if answer.status_code != 302 or "sessionid" not in self.session.cookies:
            raise BenchmarkError(f"console login answered {answer.status_code}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.session.close()

    def _read(self) -> None:
        try:
            turn = 0
            while not self._stop.wait(CONSOLE_EVERY):
                page = CONSOLE_PAGES[turn % len(CONSOLE_PAGES)]
                turn += 1
                path = self._path(page)
                if path is not None:
                    self._get(page, path)
        finally:
            connection.close()  # this thread's own database connection

    def _path(self, page: str) -> str | None:
        if page == "incomplete_batches":
            return reverse("console:batches")
        if page == "batch_error_summary":
            # The operator opens the latest batch with errors (any batch before there is one).
            batches = AggregatedBatch.objects.order_by("-error_count", "-id")
            batch_id = batches.values_list("id", flat=True).first()
            return None if batch_id is None else (
                reverse("console:batch-summary", args=[batch_id]) + "?fragment=1"
            )
        if page == "records":
            return f"{reverse('console:records')}?{urlencode({'status': RecordStatus.ERROR})}"
        return reverse("console:activity")

    def _get(self, page: str, path: str) -> None:
        started = time.monotonic()
        try:
            answer = self.session.get(f"{self.base_url}{path}", allow_redirects=False, timeout=60)
        except requests.RequestException as exc:
            self.errors.add(f"console {page}", "no answer", repr(exc))
            return
        if answer.status_code != 200:
            self.errors.add(f"console {page}", str(answer.status_code), answer.text)
            return
        self.latencies[page].append(time.monotonic() - started)


class _Beat:
    """Send the periodic tasks beat would, aggregation made due every AGGREGATE_EVERY s."""

    def __init__(self, app: Celery, *, queue: str):
        self.app, self.queue = app, queue
        self.sent: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def tick(self) -> None:
        if self._due(AGGREGATE_TASK, AGGREGATE_EVERY) and _make_aggregation_due():
            self._send(AGGREGATE_TASK, expires=AGGREGATE_EVERY * 4)
        if self._due(SWEEP_TASK, SWEEP_EVERY):
            self._send(SWEEP_TASK, expires=SWEEP_EVERY * 4)

    def hurry(self) -> None:
        """Make every task due at the next tick."""
        self._last.clear()

    def _due(self, task: str, every: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(task, -every) < every:
            return False
        self._last[task] = now
        return True

    def _send(self, task: str, *, expires: float) -> None:
        self.app.send_task(task, queue=self.queue, expires=expires)
        self.sent[task] += 1


def _make_aggregation_due() -> bool:
    """Clear the last run, so the task aggregates now; False while a run is under way.

    The configured frequency is 5 minutes at least; this makes a run due every
    AGGREGATE_EVERY seconds instead. A run holds the configuration row locked: then
    nothing is cleared (and no task sent), rather than waiting for the run to end.
    """
    with transaction.atomic():
        rows = AggregationConfig.objects.filter(pk=1)
        if not rows.select_for_update(skip_locked=True).values_list("pk", flat=True):
            return False
        rows.update(last_run_at=None)
    return True


# --- set-up and results --------------------------------------------------------------------


def _ingest_token() -> str:
    user = get_user_model().objects.create_user("soak-ingest", password=secrets.token_urlsafe())
    return Token.objects.create(user=user).key


def _operator() -> tuple[str, str]:
    password = secrets.token_urlsafe()
    get_user_model().objects.create_user("soak-operator", password=password)
    return "soak-operator", password


def _ms(values: list[float], percent: float) -> float | None:
    return round(_percentile(values, percent) * 1000, 1) if values else None


class _WorkerLog:
    """What the worker's log says: failed tasks by name, aggregation races, and when each
    batch was claimed how long after its publish."""

    CLAIM = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*claimed (\d+) ms after its publish",
        re.M,
    )

    def __init__(self, text: str):
        self.failed_tasks = Counter(re.findall(r"Task (\S+?)\[[0-9a-f-]+\] raised", text))
        self.tracebacks = text.count("Traceback")
        # (when, ms): the worker logs in UTC (TIME_ZONE), with millisecond timestamps.
        self.claims = [
            (datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
             + int(millis) / 1000, int(ms))
            for when, millis, ms in self.CLAIM.findall(text)
        ]

    def claim_ms(self, *, since: float = 0, until: float = float("inf")) -> list[int]:
        return [ms for when, ms in self.claims if since <= when < until]


def _results(*, run, report, errors, seconds, rate, worker_memory, worker_log, machine):
    ingest, console, beat = run["ingest"], run["console"], run["beat"]
    stored = UsageEvent.objects.count()
    problems = list(report.problems)
    if ingest.created != len(ingest.sent) or stored != len(ingest.sent):
        problems.append(
            f"{len(ingest.sent)} distinct events were accepted, the API created "
            f"{ingest.created}, the table holds {stored}"
        )
    if not run["drained"]:
        problems.append(
            f"the pipeline did not drain within {DRAIN_TIMEOUT:.0f} s (the last run found "
            f"{run['final_run_events']} events left)"
        )
    error_summary = errors.summary()
    failed_runs = worker_log.failed_tasks[AGGREGATE_TASK]
    if worker_log.failed_tasks:
        # A task that fails under load (an aggregation run, say) leaves usage unbilled
        # until the load stops, even when the drain then shows nothing was lost.
        problems.append(f"tasks failed in the worker: {dict(worker_log.failed_tasks)}")
    ok = not problems and not error_summary["http_5xx"] and not error_summary["other"]

    runs = SyncActivity.objects.filter(action_name=SyncActivity.Action.AGGREGATE, actor="scheduler")
    run_ms = list(runs.values_list("duration_ms", flat=True))
    calls = SyncActivity.objects.filter(action_name=SyncActivity.Action.BULK_RECORD_USAGE)
    call_ms = [ms for ms in calls.values_list("duration_ms", flat=True) if ms is not None]
    by_status = dict(
        UsageRecord.objects.order_by().values_list("status").annotate(n=Count("id"))
    )
    errors_by_code = dict(
        UsageRecord.objects.filter(status=RecordStatus.ERROR)
        .order_by().values_list("sync_error_code").annotate(n=Count("id"))
    )
    synced = sum(n for status, n in by_status.items() if status != RecordStatus.PENDING)
    restart = run["restart"]
    claims = worker_log.claim_ms(until=restart["at"] if restart else float("inf"))
    sync_span = run["ingest_seconds"] + run["drain_seconds"]
    completion = _completion_seconds()
    return [
        {
            "benchmark": "soak_ingest",
            "seconds": round(run["ingest_seconds"], 1),
            "target_events_per_s": rate,
            # Every event the API accepted, re-sends included; then the distinct ones.
            "events_per_s": round(ingest.received / run["ingest_seconds"], 1),
            "distinct_events_per_s": round(len(ingest.sent) / run["ingest_seconds"], 1),
            "events_sent": ingest.received,
            "events_distinct": len(ingest.sent),
            "events_stored": stored,
            "duplicates_answered": ingest.duplicates,
            "unknown_account_events": sum(
                1 for n in ingest.sent if n % UNKNOWN_EVERY == UNKNOWN_EVERY // 2
            ),
            "requests": ingest.requests,
            "request_size": REQUEST_SIZE,
            "clients": INGEST_CLIENTS,
            "late_requests": ingest.late,
            "max_lag_s": round(ingest.max_lag, 2),
            "latency_p50_ms": _ms(ingest.latencies, 50),
            "latency_p95_ms": _ms(ingest.latencies, 95),
            "latency_max_ms": _ms(ingest.latencies, 100),
        },
        {
            "benchmark": "soak_aggregation",
            "tasks_sent": beat.sent[AGGREGATE_TASK],
            # Runs that aggregated something (each leaves an activity entry), and runs whose
            # task failed.
            "runs": len(run_ms),
            "runs_failed": failed_runs,
            "events_unaggregated_at_stop": run["unaggregated_at_stop"],
            "records": runs.aggregate(n=Sum("record_count"))["n"] or 0,
            "batches": AggregatedBatch.objects.count(),
            "run_ms_p50": _percentile(run_ms, 50) if run_ms else None,
            "run_ms_p95": _percentile(run_ms, 95) if run_ms else None,
            "every_s": AGGREGATE_EVERY,
        },
        {
            "benchmark": "soak_sync",
            "records_synced": synced,
            "records_per_s": round(synced / sync_span, 1),
            "records_by_status": by_status,
            "errors_by_code": errors_by_code,
            "calls": len(call_ms),
            "call_ms_p50": _percentile(call_ms, 50) if call_ms else None,
            "call_ms_p95": _percentile(call_ms, 95) if call_ms else None,
            "aggregated_to_complete_s_p50": completion[0],
            "aggregated_to_complete_s_p95": completion[1],
            # From a batch id's last publish to a consumer claiming the batch.
            "publish_to_claim_ms_p50": _percentile(claims, 50) if claims else None,
            "publish_to_claim_ms_p95": _percentile(claims, 95) if claims else None,
            "publish_to_claim_ms_max": max(claims, default=None),
            "drain_seconds": round(run["drain_seconds"], 1),
            "worker": worker_memory,
        },
        {
            "benchmark": "soak_console",
            "every_s": CONSOLE_EVERY,
            "pages": {
                page: {
                    "requests": len(console.latencies[page]),
                    "p50_ms": _ms(console.latencies[page], 50),
                    "p95_ms": _ms(console.latencies[page], 95),
                }
                for page in CONSOLE_PAGES
            },
        },
        *([_restart_result(restart, worker_log)] if restart else []),
        {
            "benchmark": "soak_summary",
            "seconds": seconds,
            "rate": rate,
            "wall_seconds": round(run["run_seconds"], 1),
            "drained": run["drained"],
            "errors": error_summary,
            "failed_tasks": dict(worker_log.failed_tasks),
            "worker_log_tracebacks": worker_log.tracebacks,
            "invariants": {
                "ok": report.ok,
                "checked": report.checked,
                "problems": report.problems[:20],
                "problem_count": len(report.problems),
            },
            "problems": problems[:20],
            "ok": ok,
            "machine": machine,
        },
    ]


def _restart_result(restart: dict, worker_log: _WorkerLog) -> dict:
    """Claims in the minute after a worker restart began: the batches published while it
    was down or while its consumers joined the group."""
    claims = worker_log.claim_ms(since=restart["at"], until=restart["at"] + 60)
    return {
        "benchmark": "soak_worker_restart",
        "stop_and_start_seconds": round(restart["seconds"], 1),
        "claims_in_the_next_minute": len(claims),
        "publish_to_claim_ms_p50": _percentile(claims, 50) if claims else None,
        "publish_to_claim_ms_p95": _percentile(claims, 95) if claims else None,
        "publish_to_claim_ms_max": max(claims, default=None),
    }


def _completion_seconds() -> tuple[float | None, float | None]:
    """p50 and p95 of the seconds from a record's aggregation to its COMPLETE."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s),
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY s)
            FROM (SELECT EXTRACT(EPOCH FROM completed_at - created_at) AS s
                  FROM {UsageRecord._meta.db_table} WHERE status = %s) AS c
            """,
            [RecordStatus.COMPLETE],
        )
        p50, p95 = cursor.fetchone()
    return (
        None if p50 is None else round(float(p50), 2),
        None if p95 is None else round(float(p95), 2),
    )
