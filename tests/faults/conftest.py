"""The fault suite's stack: PostgreSQL, a private Redis, tansu, the core Aria simulator and
Celery worker processes, with the means to break each of them on purpose.

Every scenario ends with `stack.assert_reconciled()`: no event lost (each ingested event
stored and linked to a record), no record billed twice (the simulator holds each COMPLETE
record's client_record_id exactly once, and nothing else), and `manage.py reconcile_usage`
finding every invariant intact, core Aria included.
"""

from __future__ import annotations

import io
from collections import Counter
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from celery import Celery
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from tests.services import RedisServer, SyncStack, wait_for
from usage_sync.aggregation import aggregate_usage
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import AggregationConfig, RecordStatus, UsageEvent, UsageRecord

# Every worker and beat of the suite connects with this application_name (libpq's
# PGAPPNAME), so a test can find the worker's backend in pg_stat_activity.
APP_NAME = "allegro-fault-worker"
# The simulator's fault knobs, all off.
CALM = {
    "latency_seconds": 0, "error_rate": 0, "late_answer_seconds": 0, "fail_next_n": 0,
    "flap_fail_calls": 0, "flap_pass_calls": 0, "fail_after_store": False, "malformed_rate": 0,
    "malformed_next_n": 0, "bogus_error_records": 0, "anonymous_error_records": False,
    "late_store_seconds": 0,
}


class FaultStack(SyncStack):
    def __init__(self, tmp_path, settings, broker, simulator, redis: RedisServer):
        super().__init__(tmp_path, settings, broker, simulator, redis_url=redis.url)
        self.redis = redis
        self.env["PGAPPNAME"] = APP_NAME
        self.ingested = 0
        self.beats = []

    # --- usage ------------------------------------------------------------------------------

    def ingest(self, *, accounts: list[str], hours: int = 4, per_group: int = 3,
               prefix: str = "e", days_ago: int = 2) -> int:
        """Store events of closed hourly windows `days_ago` days back; return how many."""
        day = datetime.combine(
            timezone.now().date() - timedelta(days=days_ago), datetime.min.time(), tzinfo=UTC
        )
        raw = [
            {
                "event_id": f"{prefix}-{account}-{hour}-{n}",
                "client_acct_id": account,
                "usage_type_code": "API_CALLS",
                "usage_units": "1.25",
                "usage_date": (day + timedelta(hours=hour, minutes=n)).isoformat(),
            }
            for account in accounts
            for hour in range(hours)
            for n in range(per_group)
        ]
        events, errors = validate_events(raw)
        assert not errors
        store_events(events)
        self.ingested += len(events)
        return len(events)

    def configure(self, *, batch_size: int) -> None:
        config = AggregationConfig.load()
        config.batch_size = batch_size
        config.save()

    def aggregate(self, *, batch_size: int = 3) -> list[int]:
        """Aggregate here (not in a worker) and return the new batch ids."""
        self.configure(batch_size=batch_size)
        return aggregate_usage(now=timezone.now()).batch_ids

    # --- processes --------------------------------------------------------------------------

    def start_beat(self, name: str = "beat"):
        from tests.services import Beat

        beat = Beat(f"{name}-{len(self.beats)}", env=self.env,
                    log=self.tmp_path / f"worker-{name}.log").start()
        self.beats.append(beat)
        return beat

    def send_task(self, name: str) -> None:
        """Queue a task on the stack's Redis, as beat does."""
        app = Celery("fault-tests", broker=self.redis.url)
        try:
            app.send_task(name)
        finally:
            app.close()

    def tick_aggregation(self) -> None:
        """Do what beat does once a minute: queue aggregate_usage_if_due (beat's first tick
        comes a minute after it starts, too long for a test)."""
        self.send_task("usage_sync.tasks.aggregate_usage_if_due")

    def wait_until_ready(self, count: int = 1) -> None:
        wait_for(lambda: self.logs().count(" ready.") >= count, timeout=60,
                 what="the workers to be ready")

    def logs(self) -> str:
        return "\n".join(log.read_text() for log in sorted(self.tmp_path.glob("worker-*.log")))

    def close(self):
        for beat in self.beats:
            beat.stop()
        super().close()

    # --- PostgreSQL ---------------------------------------------------------------------------

    def worker_backends(self, *, blocked_on: str | None = None) -> list[int]:
        """Pids of the workers' backends; with `blocked_on`, only those waiting for a lock
        in a statement containing that text."""
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid, wait_event_type, query FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database()",
                [APP_NAME],
            )
            rows = cursor.fetchall()
        return [
            pid for pid, wait, query in rows
            if blocked_on is None or (wait == "Lock" and blocked_on in query)
        ]

    def terminate(self, pid: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
            assert cursor.fetchone()[0], f"backend {pid} was not terminated"

    @contextmanager
    def row_lock(self, table: str, row_id: int):
        """Hold a row lock (SELECT … FOR UPDATE) from a connection of our own."""
        db = connection.settings_dict
        with psycopg.connect(host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"],
                             dbname=db["NAME"]) as conn:
            conn.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", [row_id])
            try:
                yield
            finally:
                conn.rollback()

    # --- the proof ----------------------------------------------------------------------------

    def assert_reconciled(self, *, timeout: float = 120, unknown_accounts=()) -> str:
        """Wait until every event is aggregated and no record is PENDING, then prove that
        nothing was lost or billed twice."""
        try:
            # Ingested into closed windows: aggregated once no record is OPEN any more.
            wait_for(lambda: not UsageRecord.objects.filter(batch__isnull=True).exists()
                     and not UsageEvent.objects.filter(record__isnull=True).exists(),
                     timeout=timeout, what="every event to be aggregated", interval=0.5)
        except TimeoutError:
            raise AssertionError(f"events left unaggregated\n{self.logs()[-5000:]}") from None
        self.wait_until_settled(timeout=timeout)
        # No event lost: every ingested event is stored and went into a record.
        assert UsageEvent.objects.count() == self.ingested
        assert not UsageEvent.objects.filter(record__isnull=True).exists()
        # No record billed twice, none billed that is not COMPLETE here.
        held = Counter(r["client_record_id"] for r in self.simulator.records())
        assert {cid: n for cid, n in held.items() if n != 1} == {}, "billed more than once"
        complete = set(
            UsageRecord.objects.filter(status=RecordStatus.COMPLETE)
            .values_list("client_record_id", flat=True)
        )
        assert set(held) == complete
        # The faults themselves never turn into record errors: only Aria's 1009 for the
        # accounts it does not know.
        errors = set(
            UsageRecord.objects.filter(status=RecordStatus.ERROR)
            .values_list("client_acct_id", "sync_error_code")
        )
        assert errors == {(account, "1009") for account in unknown_accounts}
        # Counts reconcile, core Aria included: the operator's command, once core Aria
        # behaves again (its lookups would fail like the sync's).
        self.simulator.configure(**CALM)
        out = io.StringIO()
        try:
            call_command("reconcile_usage", stdout=out)
        except CommandError:
            pytest.fail(f"reconcile_usage found disagreements:\n{out.getvalue()}")
        assert "Everything reconciles (database and core Aria)." in out.getvalue()
        return out.getvalue()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(log=tmp_path / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def stack(tmp_path, settings, broker, simulator, redis_server):
    stack = FaultStack(tmp_path, settings, broker, simulator, redis_server)
    yield stack
    stack.close()


def wait_for_call(stack: FaultStack, rest_call: str, *, after: int = 0, timeout: float = 60):
    """Wait until core Aria received a call of that kind (beyond the first `after`)."""
    return wait_for(
        lambda: [c for c in stack.simulator.calls() if c.get("rest_call") == rest_call][after:],
        timeout=timeout, what=f"a {rest_call} call", interval=0.05,
    )
