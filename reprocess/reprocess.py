"""Queue failed and stuck aggregated records for another sync (three levels: all, a batch,
one error-summary line of a batch).

A reprocess never sends anything itself: it moves ERROR records back to PENDING, leaves
stale PENDING records as they are (sync_batch reconciles those in doubt with core Aria
before it re-sends anything), recomputes the counters of the batches concerned, and puts
their ids on the topic after commit. The sync path then does what it always does.

A request only records the run, with the count the batch counters give (`records_expected`);
the queueing itself (`queue_run`) goes through the scope's batches in id order, a chunk of
about REPROCESS_CHUNK_RECORDS records per transaction, publishing each chunk after its
commit. A small scope (up to REPROCESS_INLINE_RECORDS) is queued within the request; a
larger one by a Celery task, so the request answers at once whatever the scope's size.

Guards:
- COMPLETE and IGNORED records are never selected.
- A batch whose sync call is under way (IN_PROCESS with a fresh claim) is left alone: its
  records are in flight, and flipping its status would let a second worker claim it.
- Two runs over overlapping scopes queue each record once (see `_lock_batches`).
- A chunk holds its run's row lock and moves the run's cursor past its batches in the same
  transaction: a task run twice, or resumed after a crash, never queues a batch twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Min, Sum
from django.utils import timezone

from usage_sync import publishing
from usage_sync.models import AggregatedBatch, RecordStatus, SyncActivity, UsageRecord

from . import metrics
from .models import ReprocessLevel, ReprocessRun, ReprocessRunRecord

logger = logging.getLogger(__name__)

REPROCESSABLE = (RecordStatus.ERROR, RecordStatus.PENDING)
PUBLISH_TIMEOUT_SECONDS = 5.0
# Candidate batches read per chunk at most (their records add up to the chunk's size first
# unless batches are small).
_CHUNK_BATCHES = 1000


class ReprocessError(Exception):
    """A reprocess request that cannot be carried out; `kind` maps to an HTTP status."""

    def __init__(self, message: str, *, kind: str = "invalid"):
        super().__init__(message)
        self.message = message
        self.kind = kind  # "invalid" (400), "not_found" (404), "conflict" (409)


def reprocess_run_create(
    *,
    level: str,
    batch_id: int | None = None,
    error_code: str | None = None,
    status: str | None = None,
    actor: str,
    reason: str = "",
    dry_run: bool = False,
    defer: bool = True,
) -> ReprocessRun:
    """Record a reprocess run over one scope and have its records queued; return the run.

    The run's `records_expected` and `batches_expected` come from the batch counters: at
    most that many are queued (PENDING records a run queued already are not queued again).
    With `dry_run` nothing changes and the run is not saved (pk None). A scope of up to
    REPROCESS_INLINE_RECORDS, or any scope with `defer=False`, is queued before this
    returns; a larger one by the `queue_reprocess_run` task after commit.
    """
    run = ReprocessRun(
        level=_valid_level(level),
        batch_id=batch_id,
        error_code=(error_code or "").strip(),
        status=(status or "").strip().upper(),
        actor=actor,
        reason=reason,
    )
    _validate_scope(run)
    _expect(run)
    if dry_run:
        return run
    with transaction.atomic():
        if run.level != ReprocessLevel.ALL and not _free([run.batch_id]):
            # Refused at once rather than recorded and left waiting: the operator retries.
            raise _in_flight(run)
        run.save()
        transaction.on_commit(lambda: metrics.REPROCESS_RUNS.labels(run.level).inc())
    if not defer or run.records_expected <= settings.REPROCESS_INLINE_RECORDS:
        queue_run(run.pk)
    else:
        transaction.on_commit(lambda: _start(run.pk))
    run.refresh_from_db()
    logger.info(
        "reprocess run %s (%s) by %s: %s",
        run.pk, run.object_name, actor,
        f"{run.records_selected} records in {run.batches_selected} batches queued"
        if run.is_queued else f"up to {run.records_expected} records to queue in the background",
        extra={"reprocess_run_id": run.pk, "records": run.records_expected},
    )
    return run


def queue_run(run_id: int) -> None:
    """Queue what is left of a run, chunk by chunk (the task's body; safe to run twice)."""
    while not _queue_chunk(run_id):
        pass


def unqueued_runs(*, older_than_seconds: float) -> list[int]:
    """Runs still queueing that were recorded this long ago: their task may have died."""
    before = timezone.now() - timedelta(seconds=older_than_seconds)
    return list(
        ReprocessRun.objects.filter(queued_at__isnull=True, created_at__lt=before)
        .order_by("id").values_list("id", flat=True)
    )


def error_summary(batch: AggregatedBatch) -> list[dict]:
    """A batch's reprocessable records by (status, error code), with a message and a count:
    the lines the console and the API offer to reprocess. One GROUP BY query."""
    rows = (
        UsageRecord.objects.filter(batch=batch, status__in=REPROCESSABLE)
        .order_by()
        .values("status", "sync_error_code")
        # Messages of one code may differ in detail; the group is (status, code).
        .annotate(error_message=Min("sync_error_message"), count=Count("id"))
        .order_by("status", "sync_error_code")
    )
    return [
        {"error_code": r["sync_error_code"], "error_message": r["error_message"],
         "status": r["status"], "count": r["count"]}
        for r in rows
    ]


def _valid_level(level: str) -> str:
    if level not in ReprocessLevel.values:
        raise ReprocessError(
            f"Unknown reprocess level {level!r}; use one of {', '.join(ReprocessLevel.values)}."
        )
    return level


def _validate_scope(run: ReprocessRun) -> None:
    if run.level == ReprocessLevel.ALL:
        return
    if run.batch_id is None:
        raise ReprocessError(f"Reprocess level {run.level} needs a batch id.")
    if not AggregatedBatch.objects.filter(pk=run.batch_id).exists():
        raise ReprocessError(f"Batch {run.batch_id} does not exist.", kind="not_found")
    if run.level != ReprocessLevel.ERROR_SUMMARY:
        return
    if not run.status:
        raise ReprocessError("The error summary level needs a status (ERROR or PENDING).")
    if run.status not in RecordStatus.values:
        raise ReprocessError(
            f"Unknown status {run.status!r}; use one of {', '.join(RecordStatus.values)}."
        )
    if run.status not in REPROCESSABLE:
        raise ReprocessError(
            f"{run.status} records have nothing to reprocess: only ERROR and PENDING "
            "records are sent again."
        )
    if not _summary_group(run).exists():
        code = f"error code {run.error_code!r}" if run.error_code else "no error code"
        raise ReprocessError(
            f"Batch {run.batch_id} has no {run.status} records with {code}."
        )


def _summary_group(run: ReprocessRun):
    return UsageRecord.objects.filter(
        batch_id=run.batch_id, status=run.status, sync_error_code=run.error_code
    )


def _expect(run: ReprocessRun) -> None:
    """Set what the run will queue at most, from the maintained counters (no record scan;
    a summary line counts its group through the batch's status index)."""
    if run.level == ReprocessLevel.ERROR_SUMMARY:
        run.records_expected = _summary_group(run).count()
        run.batches_expected = 1 if run.records_expected else 0
        return
    totals = _candidate_batches(run).aggregate(
        batches=Count("id"), records=Sum("pending_count") + Sum("error_count")
    )
    run.records_expected = totals["records"] or 0
    run.batches_expected = totals["batches"] if run.records_expected else 0


def _candidate_batches(run: ReprocessRun):
    if run.level == ReprocessLevel.ALL:
        # The maintained counters, served by batch_incomplete_idx.
        return AggregatedBatch.objects.incomplete()
    return AggregatedBatch.objects.filter(pk=run.batch_id)


def _start(run_id: int) -> None:
    """Hand the run to a worker; should that fail, the resume sweep hands it over later."""
    from .tasks import queue_reprocess_run

    try:
        queue_reprocess_run.delay(run_id)
    except Exception:
        logger.exception("reprocess run %s: the task could not be sent; the sweep resumes it",
                         run_id)


def _queue_chunk(run_id: int) -> bool:
    """Queue the run's next chunk of batches in one transaction; return True once the run
    is all queued (or another task holds it and will finish it)."""
    with transaction.atomic():
        run = (
            ReprocessRun.objects.select_for_update(skip_locked=True)
            .filter(pk=run_id, queued_at__isnull=True).first()
        )
        if run is None:
            return True
        chunk, last = _next_chunk(run)
        free = _lock_batches(chunk)
        if chunk and not free and run.level != ReprocessLevel.ALL:
            # Its one batch went into a sync call since the request: the resume sweep
            # comes back to it (unqueued_runs) once the call is over.
            return True
        batch_ids, records = _queue(run, free)
        run.records_selected += records
        run.batches_selected += len(batch_ids)
        run.queue_cursor = chunk[-1] if chunk else run.queue_cursor
        fields = ["records_selected", "batches_selected", "queue_cursor"]
        if last:
            run.queued_at = timezone.now()
            fields.append("queued_at")
            if not run.records_selected:
                run.finished_at = run.queued_at
                fields.append("finished_at")
        run.save(update_fields=fields)
        if last:
            _log_activity(run)
        transaction.on_commit(lambda: _publish(run_id, batch_ids))
    return last


def _next_chunk(run: ReprocessRun) -> tuple[list[int], bool]:
    """The next batches past the cursor whose records add up to about a chunk, in id
    order, and whether they are the scope's last."""
    rows = list(
        _candidate_batches(run).filter(id__gt=run.queue_cursor).order_by("id")
        .values_list("id", "total_count")[: _CHUNK_BATCHES + 1]
    )
    chunk, size = [], 0
    for batch_id, total in rows:
        if chunk and size + total > settings.REPROCESS_CHUNK_RECORDS:
            return chunk, False
        chunk.append(batch_id)
        size += total
    last = len(rows) <= _CHUNK_BATCHES
    return (chunk, True) if last else (chunk[:_CHUNK_BATCHES], False)


def _lock_batches(batch_ids: list[int]) -> list[int]:
    """Lock these batches in id order; return those not in flight.

    Why this makes overlapping runs queue each record once: every chunk locks its
    batches (SELECT … FOR UPDATE, always in id order, so two runs cannot deadlock)
    before it reads or writes their records, and keeps the locks until commit. A chunk of
    another run over the same batches waits here until the first commits; its statements
    after that see the first one's work: the records it flipped are no longer ERROR, and
    as PENDING records they are linked to the first run, so `_queue` skips them.
    The ERROR → PENDING UPDATE is state-guarded as well, a second line of defence.
    The sync path cannot change these batches' records meanwhile either: it only writes
    records of a batch it claimed, and claiming updates the batch row we hold locked.
    """
    if not batch_ids:
        return []
    list(AggregatedBatch.objects.filter(id__in=batch_ids).order_by("id")
         .select_for_update().values_list("id", flat=True))
    return _free(batch_ids)


def _free(batch_ids: list[int]) -> list[int]:
    """Return the ids of the batches no sync call is working on (no claim, or a stale one)."""
    return list(
        AggregatedBatch.objects.filter(id__in=batch_ids).claimable(timezone.now())
        .order_by("id").values_list("id", flat=True)
    )


def _in_flight(run: ReprocessRun) -> ReprocessError:
    return ReprocessError(
        f"Batch {run.batch_id} is being synced right now; reprocess it when the call "
        "has finished.",
        kind="conflict",
    )


# The scope's records that may be sent again: ERROR ones, and PENDING ones no reprocess run
# queued already (those are queued: each record is counted once). One statement links them
# to the run, keeping their previous outcome, and flips the ERROR ones to PENDING.
# sent_at stays as it is: a PENDING record with sent_at set is in doubt, and only
# sync_batch may clear it, after asking core Aria.
_QUEUE_SQL = """
    WITH picked AS MATERIALIZED (
        SELECT r.id, r.batch_id, r.status, r.sync_error_code, r.sync_error_message
        FROM {records} r
        WHERE r.batch_id = ANY(%(batches)s) {summary}
          AND (r.status = 'ERROR' OR (r.status = 'PENDING' AND NOT EXISTS (
                SELECT 1 FROM {links} l WHERE l.record_id = r.id)))
    ), linked AS (
        INSERT INTO {links} (run_id, record_id, previous_status, previous_error_code,
                             previous_error_message)
        SELECT %(run)s, id, status, sync_error_code, sync_error_message FROM picked
    ), flipped AS (
        UPDATE {records} r
        SET status = 'PENDING', sync_error_code = '', sync_error_message = '',
            updated_at = now()
        FROM picked p
        WHERE r.id = p.id AND p.status = 'ERROR' AND r.status = 'ERROR'
    )
    SELECT batch_id, COUNT(*) FROM picked GROUP BY batch_id ORDER BY batch_id
"""


def _queue(run: ReprocessRun, batch_ids: list[int]) -> tuple[list[int], int]:
    """Queue the selected records of these batches; recount them; return (batches, records)."""
    if not batch_ids:
        return [], 0
    summary = ""
    params = {"run": run.pk, "batches": batch_ids}
    if run.level == ReprocessLevel.ERROR_SUMMARY:
        summary = "AND r.status = %(status)s AND r.sync_error_code = %(code)s"
        params |= {"status": run.status, "code": run.error_code}
    sql = _QUEUE_SQL.format(
        links=ReprocessRunRecord._meta.db_table, records=UsageRecord._meta.db_table,
        summary=summary,
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        counts = cursor.fetchall()
    affected = [batch_id for batch_id, _ in counts]
    _recount(affected)
    return affected, sum(n for _, n in counts)


def _recount(batch_ids: list[int]) -> None:
    """Recount the batches from their records and queue them for the sweep."""
    if not batch_ids:
        return
    batches = AggregatedBatch.objects.filter(id__in=batch_ids)
    # Every affected batch has a PENDING record now, so the recount makes it PENDING. A
    # stale claim on it is dropped: its frozen holder, should it wake, then writes nothing.
    batches.recount(release=True)
    # published_at NULL makes the sweep publish it even if the publish after commit fails.
    batches.update(
        claim_token=None, published_at=None, next_retry_at=None, updated_at=timezone.now()
    )


def _log_activity(run: ReprocessRun) -> None:
    batch_ids = list(
        ReprocessRunRecord.objects.filter(run=run).order_by("record__batch_id")
        .values_list("record__batch_id", flat=True).distinct()[:1000]
    )
    SyncActivity.objects.create(
        action_name=SyncActivity.Action.REPROCESS,
        object_name=run.object_name,
        status=SyncActivity.Status.COMPLETE,
        batch_id=run.batch_id,
        error_code=run.error_code,
        record_count=run.records_selected,
        actor=run.actor,
        created_at=run.created_at,
        details={
            "run_id": run.pk,
            "level": run.level,
            "scope": {"batch": run.batch_id, "error_code": run.error_code, "status": run.status},
            "reason": run.reason,
            "records_selected": run.records_selected,
            "batches_selected": run.batches_selected,
            "batch_ids": batch_ids,
        },
    )


def _publish(run_id: int, batch_ids: list[int]) -> None:
    if not batch_ids:
        return
    try:
        publishing.publish_batches(batch_ids, timeout=PUBLISH_TIMEOUT_SECONDS)
    except Exception:
        # The batches are committed PENDING with published_at NULL: the sweep sends them.
        logger.exception(
            "reprocess run %s: publishing %d batch ids failed; the sweep will publish them",
            run_id,
            len(batch_ids),
        )
