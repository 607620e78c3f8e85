"""Aggregate raw usage events of closed windows into records and batches, in set-based SQL.

One run, in one transaction, serialized by a row lock on the configuration:

1. stage the groups: un-aggregated events of closed windows summed by window and the
   configured grouping key (INSERT … SELECT … GROUP BY into a temporary table), each
   group numbered within its window so it knows its batch and position;
2. create the batches (late events get the next sequence numbers of their window);
3. create the records from the staged groups;
4. link every staged event to its record (UPDATE … FROM), then check that exactly the
   staged events were linked, so an event that arrived mid-run is never linked to a sum
   that does not include it (it waits for the next run instead).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.db import OperationalError, connection, transaction
from django.utils import timezone

from . import publishing
from .models import AggregatedBatch, AggregationConfig, SyncActivity, UsageEvent, UsageRecord

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STAGE = "usage_aggregation_stage"
_ANALYZE_ABOVE = 10_000
# The steps of one run, in order, as `on_step` hears about them (a command's progress bar).
STEPS = ("stage", "batches", "records", "link", "commit")


class AggregationRace(Exception):
    """Events arrived between staging and linking; the run is rolled back and retried."""


@dataclasses.dataclass(frozen=True)
class AggregationResult:
    boundary: datetime
    events: int
    records: int
    batch_ids: list[int]

    @property
    def batches(self) -> int:
        return len(self.batch_ids)


def window_boundary(*, now: datetime, frequency: timedelta, grace: timedelta) -> datetime:
    """Return the start of the first window that is not yet closed at `now`.

    A window [s, s + frequency) is closed once s + frequency + grace <= now; windows are
    aligned to the Unix epoch in UTC (hourly windows start on the hour, daily at 00:00 UTC).
    """
    horizon = now - grace
    step = int(frequency.total_seconds())
    elapsed = int((horizon - _EPOCH).total_seconds())
    return _EPOCH + timedelta(seconds=elapsed - elapsed % step)


def aggregate_usage(
    *,
    now: datetime | None = None,
    actor: str = "scheduler",
    on_step: Callable[[str], None] | None = None,
) -> AggregationResult:
    """Aggregate every closed window's un-aggregated events; safe to run concurrently.

    `on_step` is called with each name of STEPS once that step is done (a retry after a
    race with ingest calls it again from "stage").
    """
    now = now or timezone.now()
    on_step = on_step or _ignore_step
    # A run of its own transaction reads one snapshot (REPEATABLE READ), so its link sees
    # exactly the events its stage saw: events that arrive meanwhile wait for the next
    # run instead of failing this one. Inside a caller's transaction (tests) that is not
    # possible, and the count check below still catches a race.
    snapshot = not connection.in_atomic_block
    for attempt in range(1, 4):
        try:
            result = _aggregate_once(now=now, actor=actor, on_step=on_step, snapshot=snapshot)
        except AggregationRace:
            logger.warning("aggregation raced with ingest, retrying (attempt %d)", attempt)
        except OperationalError as exc:
            # The configuration row changed after the snapshot was taken (another run).
            if getattr(exc.__cause__, "sqlstate", None) != "40001":
                raise
            logger.warning("aggregation serialization failure, retrying (attempt %d)", attempt)
        else:
            on_step("commit")
            return result
    result = _aggregate_once(now=now, actor=actor, on_step=on_step, snapshot=snapshot)
    on_step("commit")
    return result


def aggregate_and_publish(
    *, now: datetime | None = None, actor: str, on_step: Callable[[str], None] | None = None
) -> AggregationResult:
    """Aggregate, then put the new batch ids on the topic once the run has committed.

    A failed publish loses nothing: the batches wait in the database (published_at empty)
    and the sweep publishes them.
    """
    result = aggregate_usage(now=now, actor=actor, on_step=on_step)
    try:
        publishing.publish_batches(result.batch_ids)
    except Exception:
        logger.exception("publishing %d batches failed; the sweep will retry", result.batches)
    return result


def _ignore_step(step: str) -> None:
    return None


@transaction.atomic
def _aggregate_once(
    *, now: datetime, actor: str, on_step: Callable[[str], None], snapshot: bool = False
) -> AggregationResult:
    started = time.monotonic()
    if snapshot:
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    AggregationConfig.load()
    # The guard: concurrent runs queue here and then see the events already linked.
    config = AggregationConfig.objects.select_for_update().get(pk=1)
    boundary = window_boundary(now=now, frequency=config.frequency, grace=config.lateness_grace)
    last_record_id = UsageRecord.objects.order_by("-id").values_list("id", flat=True).first() or 0

    sql = _Sql(config)
    params = {
        "boundary": connection.ops.adapt_datetimefield_value(boundary),
        "batch_size": config.batch_size,
        "now": connection.ops.adapt_datetimefield_value(now),
    }
    with connection.cursor() as cursor:
        # The grouping and the link join sort or hash up to millions of rows.
        cursor.execute("SET LOCAL work_mem = '64MB'")
        cursor.execute(f"DROP TABLE IF EXISTS {_STAGE}")
        cursor.execute(sql.stage(), params)
        cursor.execute(f"SELECT COUNT(*), COALESCE(SUM(event_count), 0) FROM {_STAGE}")
        staged_records, staged_events = cursor.fetchone()
        on_step("stage")
        if staged_records:
            cursor.execute(sql.insert_batches(), params)
            batch_ids = sorted(row[0] for row in cursor.fetchall())
            on_step("batches")
            cursor.execute(sql.insert_records(), params)
            if staged_records >= _ANALYZE_ABOVE:
                # Fresh statistics, or the planner takes 240k new records for 4k and picks
                # a plan that re-reads the events table from disk.
                cursor.execute(f"ANALYZE {sql.record}")
            on_step("records")
            cursor.execute(sql.link_events(), {**params, "last_record_id": last_record_id})
            linked = cursor.rowcount
            on_step("link")
        else:
            batch_ids, linked = [], 0
            for step in ("batches", "records", "link"):
                on_step(step)
        cursor.execute(f"DROP TABLE {_STAGE}")
    if linked != staged_events:
        raise AggregationRace(f"staged {staged_events} events, linked {linked}")

    config.last_run_at = now
    config.save(update_fields=["last_run_at"])
    result = AggregationResult(
        boundary=boundary, events=int(staged_events), records=staged_records, batch_ids=batch_ids
    )
    if staged_records:
        SyncActivity.objects.create(
            action_name=SyncActivity.Action.AGGREGATE,
            object_name="aggregated usage",
            status=SyncActivity.Status.COMPLETE,
            record_count=staged_records,
            duration_ms=int((time.monotonic() - started) * 1000),
            actor=actor,
            details={
                "events": result.events,
                "batches": result.batches,
                "windows_before": boundary.isoformat(),
            },
        )
    logger.info(
        "aggregated %d events into %d records in %d batches (windows before %s)",
        result.events, result.records, result.batches, boundary.isoformat(),
    )
    return result


class _Sql:
    """The run's statements."""

    def __init__(self, config: AggregationConfig):
        self.seconds = int(config.frequency.total_seconds())
        self.qualifiers = config.grouped_qualifiers
        self.event = UsageEvent._meta.db_table
        self.record = UsageRecord._meta.db_table
        self.batch = AggregatedBatch._meta.db_table

    def window_start(self, column: str) -> str:
        return (
            f"date_bin(interval '{self.seconds} seconds', {column}, "
            "timestamptz '1970-01-01 00:00:00+00')"
        )

    def window_end(self, column: str) -> str:
        return f"{column} + interval '{self.seconds} seconds'"

    def qualifier(self, n: int, table: str = "") -> str:
        prefix = f"{table}." if table else ""
        return f"{prefix}qualifier_{n}" if n in self.qualifiers else "''"

    def stage(self) -> str:
        qualifiers = ", ".join(f"{self.qualifier(n)} AS qualifier_{n}" for n in range(1, 5))
        # Events priced upstream (amount given) and events Aria rates (no amount) never
        # share a record, nor do events of different rates: a sum must bill the same money.
        group_by = ", ".join(str(n) for n in range(1, 12))
        order = "g.client_acct_id, g.acct_no, g.usage_type_code, g.usage_type, " + ", ".join(
            f"g.qualifier_{n}" for n in range(1, 5)
        ) + ", g.rate, g.priced"
        return f"""
            CREATE TEMPORARY TABLE {_STAGE} AS
            SELECT g.*,
                   COALESCE(p.max_sequence, 0)
                     + (ROW_NUMBER() OVER w - 1) / %(batch_size)s + 1 AS sequence,
                   (ROW_NUMBER() OVER w - 1) %% %(batch_size)s + 1 AS position
            FROM (
                SELECT {self.window_start('usage_date')} AS window_start,
                       client_acct_id, acct_no, usage_type_code, usage_type, {qualifiers},
                       rate, amount IS NOT NULL AS priced,
                       SUM(usage_units) AS usage_units, SUM(amount) AS amount,
                       COUNT(*) AS event_count
                FROM {self.event}
                WHERE record_id IS NULL AND usage_date < %(boundary)s
                GROUP BY {group_by}
            ) g
            LEFT JOIN (
                SELECT window_start, MAX(sequence) AS max_sequence
                FROM {self.batch} GROUP BY window_start
            ) p ON p.window_start = g.window_start
            WINDOW w AS (PARTITION BY g.window_start ORDER BY {order})
        """

    def insert_batches(self) -> str:
        return f"""
            INSERT INTO {self.batch} (
                window_start, window_end, sequence, status, total_count, pending_count,
                completed_count, error_count, ignored_count, created_at, updated_at)
            SELECT window_start, {self.window_end('window_start')}, sequence, 'PENDING',
                   COUNT(*), COUNT(*), 0, 0, 0, %(now)s, %(now)s
            FROM {_STAGE}
            GROUP BY window_start, sequence
            RETURNING id
        """

    def insert_records(self) -> str:
        record_id = (
            "'AU' || CAST(b.id AS TEXT) || '-' || CAST(s.position AS TEXT)"
        )
        return f"""
            INSERT INTO {self.record} (
                batch_id, client_record_id, client_acct_id, acct_no, usage_type_code,
                usage_type, qualifier_1, qualifier_2, qualifier_3, qualifier_4, usage_units,
                amount, rate, usage_date, event_count, status, sync_error_code,
                sync_error_message, attempts, created_at, updated_at)
            SELECT b.id, {record_id}, s.client_acct_id, s.acct_no, s.usage_type_code,
                   s.usage_type, s.qualifier_1, s.qualifier_2, s.qualifier_3, s.qualifier_4,
                   s.usage_units, s.amount, s.rate, s.window_start, s.event_count, 'PENDING',
                   '', '', 0, %(now)s, %(now)s
            FROM {_STAGE} s
            JOIN {self.batch} b ON b.window_start = s.window_start AND b.sequence = s.sequence
            ORDER BY b.id, s.position
        """

    def link_events(self) -> str:
        e, r = self.event, "r"
        # COALESCE keeps the join hashable where NULL means "not given".
        matches = [
            f"{r}.usage_date = {self.window_start(f'{e}.usage_date')}",
            f"{r}.client_acct_id = {e}.client_acct_id",
            f"COALESCE({r}.acct_no, 0) = COALESCE({e}.acct_no, 0)",
            f"{r}.usage_type_code = {e}.usage_type_code",
            f"COALESCE({r}.usage_type, 0) = COALESCE({e}.usage_type, 0)",
            f"COALESCE({r}.rate, -1) = COALESCE({e}.rate, -1)",
            f"({r}.amount IS NULL) = ({e}.amount IS NULL)",
            *(f"{r}.qualifier_{n} = {e}.qualifier_{n}" for n in self.qualifiers),
        ]
        return f"""
            UPDATE {e} SET record_id = {r}.id
            FROM {self.record} {r}
            WHERE {e}.record_id IS NULL AND {e}.usage_date < %(boundary)s
              AND {r}.id > %(last_record_id)s
              AND {" AND ".join(matches)}
        """
