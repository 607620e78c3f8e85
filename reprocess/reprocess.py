"""Queue failed and stuck aggregated records for another sync (three levels: all, a batch,
one error-summary line of a batch).

A reprocess never sends anything itself: it moves ERROR records back to PENDING, leaves
stale PENDING records as they are (sync_batch reconciles those in doubt with core Aria
before it re-sends anything), recomputes the counters of the batches concerned, and puts
their ids on the topic after commit. The sync path then does what it always does.

Guards:
- COMPLETE and IGNORED records are never selected.
- A batch whose sync call is under way (IN_PROCESS with a fresh claim) is left alone: its
  records are in flight, and flipping its status would let a second worker claim it.
- Two requests for overlapping scopes queue each record once (see `_lock_batches`).
"""

from __future__ import annotations

import logging

from django.db import connection, transaction
from django.db.models import Count, Exists, Min, OuterRef, Q, Value
from django.utils import timezone

from usage_sync import publishing
from usage_sync.models import (
    AggregatedBatch,
    RecordStatus,
    SyncActivity,
    UsageRecord,
)

from . import metrics
from .models import ReprocessLevel, ReprocessRun, ReprocessRunRecord

logger = logging.getLogger(__name__)

REPROCESSABLE = (RecordStatus.ERROR, RecordStatus.PENDING)
PUBLISH_TIMEOUT_SECONDS = 5.0


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
) -> ReprocessRun:
    """Queue the records of one scope for another sync; return the run.

    With `dry_run` nothing changes and the returned run is not saved (pk None): its
    records_selected and batches_selected say what a real run would queue now.
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
    if dry_run:
        records = _selectable(run, _free(run, _candidate_batches(run)))
        run.records_selected = records.count()
        run.batches_selected = records.values("batch_id").distinct().count()
        return run
    with transaction.atomic():
        run.save()
        free_ids = _lock_batches(run)
        batch_ids = _queue(run, free_ids)
        run.records_selected = ReprocessRunRecord.objects.filter(run=run).count()
        run.batches_selected = len(batch_ids)
        run.finished_at = None if run.records_selected else run.created_at
        run.save(update_fields=["records_selected", "batches_selected", "finished_at"])
        _log_activity(run, batch_ids)
        transaction.on_commit(lambda: _publish(run.pk, batch_ids))
        transaction.on_commit(lambda: metrics.REPROCESS_RUNS.labels(run.level).inc())
    logger.info(
        "reprocess run %s (%s) by %s: %d records in %d batches queued",
        run.pk,
        run.object_name,
        actor,
        run.records_selected,
        run.batches_selected,
        extra={"reprocess_run_id": run.pk, "records": run.records_selected},
    )
    return run


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
    group = UsageRecord.objects.filter(
        batch_id=run.batch_id, status=run.status, sync_error_code=run.error_code
    )
    if not group.exists():
        code = f"error code {run.error_code!r}" if run.error_code else "no error code"
        raise ReprocessError(
            f"Batch {run.batch_id} has no {run.status} records with {code}."
        )


def _candidate_batches(run: ReprocessRun):
    if run.level == ReprocessLevel.ALL:
        # The maintained counters, served by batch_incomplete_idx.
        return AggregatedBatch.objects.incomplete()
    return AggregatedBatch.objects.filter(pk=run.batch_id)


def _lock_batches(run: ReprocessRun) -> list[int]:
    """Lock the scope's batches in id order; return those not in flight.

    Why this makes overlapping requests queue each record once: every reprocess locks
    its batches (SELECT … FOR UPDATE, always in id order, so two runs cannot deadlock)
    before it reads or writes their records, and keeps the locks until commit. A second
    request for an overlapping scope waits here until the first commits; its statements
    after that see the first one's work: the records it flipped are no longer ERROR, and
    as PENDING records they are linked to the first run, so `_selectable` skips them.
    The ERROR → PENDING UPDATE is state-guarded as well, a second line of defence.
    The sync path cannot change these batches' records meanwhile either: it only writes
    records of a batch it claimed, and claiming updates the batch row we hold locked.
    """
    return _free(run, _candidate_batches(run).select_for_update())


def _free(run: ReprocessRun, batches) -> list[int]:
    """Return the ids of the batches no sync call is working on (no claim, or a stale one)."""
    rows = list(batches.order_by("id").values_list("id", flat=True))
    free = list(
        AggregatedBatch.objects.filter(id__in=rows).claimable(timezone.now())
        .order_by("id").values_list("id", flat=True)
    )
    if run.level != ReprocessLevel.ALL and rows and not free:
        raise ReprocessError(
            f"Batch {run.batch_id} is being synced right now; reprocess it when the call "
            "has finished.",
            kind="conflict",
        )
    return free


def _selectable(run: ReprocessRun, batch_ids: list[int]):
    """The scope's records that may be sent again: ERROR ones, and PENDING ones that no
    reprocess run queued already (those are queued: each record is counted once)."""
    queued = ReprocessRunRecord.objects.filter(record_id=OuterRef("pk"))
    records = UsageRecord.objects.filter(
        Q(status=RecordStatus.ERROR) | (Q(status=RecordStatus.PENDING) & ~Exists(queued)),
        batch_id__in=batch_ids,
    )
    if run.level == ReprocessLevel.ERROR_SUMMARY:
        records = records.filter(status=run.status, sync_error_code=run.error_code)
    return records.order_by()


def _queue(run: ReprocessRun, batch_ids: list[int]) -> list[int]:
    """Link the selected records to the run, flip ERROR to PENDING, recount; return batches."""
    if not batch_ids:
        return []
    selected = _selectable(run, batch_ids).annotate(run_ref=Value(run.pk)).values_list(
        "run_ref", "id", "status", "sync_error_code", "sync_error_message"
    )
    select_sql, params = selected.query.sql_with_params()
    table = ReprocessRunRecord._meta.db_table
    with connection.cursor() as cursor:
        # INSERT … SELECT: the previous outcome is kept here before the UPDATE clears it.
        cursor.execute(
            f"INSERT INTO {table} (run_id, record_id, previous_status, previous_error_code, "
            f"previous_error_message) {select_sql}",
            params,
        )
    now = timezone.now()
    scope = Q(batch_id__in=batch_ids)
    if run.level == ReprocessLevel.ERROR_SUMMARY:
        scope &= Q(status=run.status, sync_error_code=run.error_code)
    # One state-guarded UPDATE. sent_at stays as it is: a PENDING record with sent_at set
    # is in doubt, and only sync_batch may clear it, after asking core Aria.
    UsageRecord.objects.filter(scope, status=RecordStatus.ERROR).update(
        status=RecordStatus.PENDING, sync_error_code="", sync_error_message="", updated_at=now
    )
    affected = sorted(
        set(
            UsageRecord.objects.filter(reprocess_links__run=run)
            .order_by()
            .values_list("batch_id", flat=True)
            .distinct()
        )
    )
    _recount(affected, now=now)
    return affected


def _recount(batch_ids: list[int], *, now) -> None:
    """Recount the batches from their records and queue them for the sweep."""
    batches = AggregatedBatch.objects.filter(id__in=batch_ids)
    # Every affected batch has a PENDING record now, so the recount makes it PENDING. A
    # stale claim on it is dropped: its frozen holder, should it wake, then writes nothing.
    batches.recount(release=True)
    # published_at NULL makes the sweep publish it even if the publish after commit fails.
    batches.update(claim_token=None, published_at=None, next_retry_at=None, updated_at=now)


def _log_activity(run: ReprocessRun, batch_ids: list[int]) -> None:
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
            "batch_ids": batch_ids[:1000],
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
