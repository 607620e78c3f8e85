"""Close the windows that have ended: number their open records into batches, set-based.

Ingest has already added every event into the OPEN record of its window and grouping key
(grouping.py), so closing costs one pass over records, not events. One run, in one
transaction, serialized by a row lock on the configuration:

1. adopt: events stored without a record (before records were opened at ingest, or
   loaded by hand) are added into open records, as ingest would have;
2. stage: the open records of windows that ended before now - grace, each numbered
   within its window (late records get the next batch sequence numbers of their window);
3. create the batches;
4. close the staged records: each gets its batch, its client_record_id and PENDING. An
   ingest adding into one of them meanwhile either commits first (its units are in the
   row the close then updates) or, once the close has committed, opens a new record,
   which a later run sends in a later batch of that window.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone

from . import grouping, publishing
from .deadlocks import run_again_on_deadlock
from .models import AggregatedBatch, AggregationConfig, SyncActivity, UsageRecord

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STAGE = "usage_aggregation_stage"
# The steps of one run, in order, as `on_step` hears about them (a command's progress bar).
STEPS = ("adopt", "stage", "batches", "close", "commit")
DEADLOCK_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class AggregationResult:
    # Windows that ended by this time (now - lateness grace) were closed.
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
    """Close every ended window's open records into batches; safe to run concurrently.

    `on_step` is called with each name of STEPS once that step is done.
    """
    now = now or timezone.now()
    on_step = on_step or _ignore_step
    # An ingest adding into records of an ended window may deadlock with the close: the
    # run starts again at once rather than leaving the window to the next beat tick.
    result = run_again_on_deadlock(
        lambda: _aggregate_once(now=now, actor=actor, on_step=on_step),
        attempts=DEADLOCK_ATTEMPTS, what="aggregation",
    )
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
    *, now: datetime, actor: str, on_step: Callable[[str], None]
) -> AggregationResult:
    started = time.monotonic()
    AggregationConfig.load()
    # The guard: concurrent runs queue here, and then find the records already closed.
    config = AggregationConfig.objects.select_for_update().get(pk=1)
    params = {
        "horizon": connection.ops.adapt_datetimefield_value(now - config.lateness_grace),
        "batch_size": config.batch_size,
        "now": connection.ops.adapt_datetimefield_value(now),
    }
    with connection.cursor() as cursor:
        cursor.execute(grouping.adopt_sql(), grouping.rule_params(config))
        adopted = cursor.fetchone()[0]
        on_step("adopt")
        cursor.execute(f"DROP TABLE IF EXISTS {_STAGE}")
        cursor.execute(_STAGE_SQL, params)
        cursor.execute(f"SELECT COUNT(*) FROM {_STAGE}")
        staged_records, events = cursor.fetchone()[0], 0
        on_step("stage")
        batch_ids: list[int] = []
        if staged_records:
            cursor.execute(_INSERT_BATCHES_SQL, params)
            batch_ids = sorted(row[0] for row in cursor.fetchall())
        on_step("batches")
        if staged_records:
            cursor.execute(_LOCK_SQL)
            cursor.execute(_CLOSE_SQL, params)
            closed = cursor.fetchall()
            if len(closed) != staged_records:
                # Only a run holding the configuration lock closes records.
                raise RuntimeError(f"staged {staged_records} open records, closed {len(closed)}")
            # Counted as closed: an ingest may have added into a record since the stage.
            events = sum(count for (count,) in closed)
        on_step("close")
        cursor.execute(f"DROP TABLE {_STAGE}")

    config.last_run_at = now
    config.save(update_fields=["last_run_at"])
    result = AggregationResult(
        boundary=now - config.lateness_grace, events=events,
        records=staged_records, batch_ids=batch_ids,
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
                "windows_ended_by": result.boundary.isoformat(),
                "events_adopted": adopted,
            },
        )
    logger.info(
        "aggregated %d events into %d records in %d batches (windows ended by %s)",
        result.events, result.records, result.batches, result.boundary.isoformat(),
    )
    return result


_RECORD = UsageRecord._meta.db_table
_BATCH = AggregatedBatch._meta.db_table
# The open records of ended windows, numbered within their window in key order.
_STAGE_SQL = f"""
    CREATE TEMPORARY TABLE {_STAGE} AS
    SELECT r.id, r.usage_date AS window_start, r.window_end,
           COALESCE(p.max_sequence, 0)
             + (ROW_NUMBER() OVER w - 1) / %(batch_size)s + 1 AS sequence,
           (ROW_NUMBER() OVER w - 1) %% %(batch_size)s + 1 AS position
    FROM {_RECORD} r
    LEFT JOIN (
        SELECT window_start, MAX(sequence) AS max_sequence FROM {_BATCH} GROUP BY window_start
    ) p ON p.window_start = r.usage_date
    WHERE r.batch_id IS NULL AND r.window_end <= %(horizon)s
    WINDOW w AS (PARTITION BY r.usage_date ORDER BY r.window_end, r.client_acct_id, r.acct_no,
                 r.usage_type_code, r.usage_type, r.qualifier_1, r.qualifier_2, r.qualifier_3,
                 r.qualifier_4, r.rate, r.amount IS NULL, r.id)
"""
_INSERT_BATCHES_SQL = f"""
    INSERT INTO {_BATCH} (
        window_start, window_end, sequence, status, total_count, pending_count,
        completed_count, error_count, ignored_count, created_at, updated_at)
    SELECT window_start, MAX(window_end), sequence, 'PENDING', COUNT(*), COUNT(*), 0, 0, 0,
           %(now)s, %(now)s
    FROM {_STAGE}
    GROUP BY window_start, sequence
    RETURNING id
"""
# The staged records locked in the order ingest upserts them (grouping.py, its key order),
# so a close and an ingest adding into the same records queue rather than deadlock. The
# stage numbered them in that order (window, then key), so its numbers sort them: no sort
# on the twelve key columns.
_LOCK_SQL = f"""
    SELECT r.id FROM {_RECORD} r JOIN {_STAGE} s ON s.id = r.id
    ORDER BY s.window_start, s.sequence, s.position
    FOR UPDATE OF r
"""
_CLOSE_SQL = f"""
    UPDATE {_RECORD} r
    SET batch_id = b.id, client_record_id = 'AU' || b.id || '-' || s.position,
        status = 'PENDING', updated_at = %(now)s
    FROM {_STAGE} s
    JOIN {_BATCH} b ON b.window_start = s.window_start AND b.sequence = s.sequence
    WHERE r.id = s.id AND r.batch_id IS NULL
    RETURNING r.event_count
"""
