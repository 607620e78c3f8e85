"""Send one aggregated batch to core Aria and store each record's outcome (SPEC §3).

The rules that protect the money:
- only PENDING records are sent; COMPLETE and IGNORED never again;
- a record goes out with `sent_at` set and committed first; if the call's outcome is
  lost (timeout, crash), the record stays PENDING with `sent_at` set: "in doubt".
  Before anything is sent again, records in doubt are looked up with
  get_usage_history_m; those core Aria holds become COMPLETE, only the rest are re-sent;
- results map back only through `out_client_record_id`;
- the batch is claimed with a compare-and-set, so a second delivery of the same batch id
  (Kafka is at-least-once) does nothing while the first is under way.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Max, Min, Q
from django.utils import timezone

from . import metrics
from .billing import AriaClient, AriaTransportError, BulkResult
from .models import AggregatedBatch, BatchStatus, RecordStatus, SyncActivity, UsageRecord

logger = logging.getLogger(__name__)

ARIA_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class Outcome(enum.StrEnum):
    SYNCED = "synced"
    SKIPPED = "skipped"  # nothing pending, gone, or another worker holds the batch
    RETRY = "retry"  # transport failure: the batch is released for a later retry


@dataclasses.dataclass(frozen=True)
class SyncResult:
    outcome: Outcome
    batch_id: int
    sent: int = 0
    completed: int = 0
    errors: int = 0
    reconciled: int = 0
    detail: str = ""


def claim_stale_after() -> timedelta:
    """How long a claim may stand before another worker may take the batch over."""
    return timedelta(seconds=settings.SYNC_CLAIM_STALE_SECONDS)


def retry_delay(attempt: int) -> timedelta:
    """Exponential backoff for transport failures: 5 s, 10 s, 20 s … capped at 10 min."""
    base = settings.SYNC_RETRY_BASE_SECONDS
    return timedelta(seconds=min(base * 2 ** max(attempt - 1, 0), 600))


def sync_batch(*, batch_id: int, client: AriaClient | None = None) -> SyncResult:
    """Claim the batch, reconcile records in doubt, send the PENDING ones, store outcomes."""
    client = client or AriaClient()
    claimed_at = _claim(batch_id)
    if claimed_at is None:
        return SyncResult(Outcome.SKIPPED, batch_id)
    try:
        reconciled = _reconcile_in_doubt(batch_id, client)
        return _send_pending(batch_id, client, reconciled)
    except AriaTransportError as exc:
        _release_for_retry(batch_id, str(exc), client)
        return SyncResult(Outcome.RETRY, batch_id, detail=str(exc))
    except Exception as exc:
        # Records sent stay in doubt (sent_at set): the next claim reconciles them first.
        logger.exception("sync of batch %s failed unexpectedly", batch_id)
        _release_after_error(batch_id, claimed_at, exc)
        raise
    except BaseException:
        # The process is going away; the stale claim lets a retry in.
        logger.exception("sync of batch %s interrupted", batch_id)
        raise


def _claim(batch_id: int) -> datetime | None:
    """Claim the batch (compare-and-set); return the claim's time, or None if not ours."""
    now = timezone.now()
    free = ~Q(status=BatchStatus.IN_PROCESS) | Q(sync_started_at__lt=now - claim_stale_after())
    claimed = AggregatedBatch.objects.filter(free, id=batch_id, pending_count__gt=0).update(
        status=BatchStatus.IN_PROCESS, sync_started_at=now, updated_at=now
    )
    return now if claimed == 1 else None


def _release_after_error(batch_id: int, claimed_at: datetime, exc: Exception) -> None:
    """Give the batch back for a retry with backoff after an unexpected error.

    Found by tests/faults (PostgreSQL connection dropped while storing an outcome): the
    batch stayed claimed, the redelivered id was skipped and committed, and the batch
    waited for the claim to go stale and the republish sweep (minutes). Now the sweep
    sends it again at `next_retry_at`. Best effort: if the database is still away, the
    stale claim remains the fallback.
    """
    if not connection.in_atomic_block:
        # A dropped connection is useless now; the ORM opens a fresh one on next use.
        connection.close_if_unusable_or_obsolete()
    now = timezone.now()
    try:
        attempt = AggregatedBatch.objects.get(pk=batch_id).sync_attempts + 1
        with transaction.atomic():
            # Only our own claim: another worker may have taken a stale one over meanwhile.
            released = AggregatedBatch.objects.filter(
                pk=batch_id, status=BatchStatus.IN_PROCESS, sync_started_at=claimed_at
            ).update(
                status=BatchStatus.PENDING,
                sync_attempts=attempt,
                next_retry_at=now + retry_delay(attempt),
                updated_at=now,
            )
            if released:
                SyncActivity.objects.create(
                    action_name="BULK_RECORD_USAGE",
                    object_name=f"Batch {batch_id}",
                    batch_id=batch_id,
                    status=SyncActivity.Status.ERROR,
                    error_code="UNEXPECTED",
                    error_message=f"{type(exc).__name__}: {exc}"[:500],
                    details={"retry_at": (now + retry_delay(attempt)).isoformat(),
                             "attempt": attempt},
                )
    except Exception:
        logger.exception(
            "batch %s: could not release the claim after the error; it is retried once "
            "the claim is stale", batch_id,
        )


def _reconcile_in_doubt(batch_id: int, client: AriaClient) -> int:
    """Mark COMPLETE the records in doubt that core Aria already holds; return how many."""
    in_doubt = UsageRecord.objects.filter(
        batch_id=batch_id, status=RecordStatus.PENDING, sent_at__isnull=False
    )
    span = in_doubt.aggregate(first=Min("usage_date"), last=Max("usage_date"))
    if span["first"] is None:
        return 0
    # order_by(): the model's ordering (id) would make DISTINCT return one row per record.
    accounts = in_doubt.order_by().values_list("client_acct_id", "acct_no").distinct()
    date_range = (_aria_date(span["first"]), _aria_date(span["last"] + timedelta(days=1)))
    found = 0
    # One account at a time, each committed: when core Aria fails now and then (flapping,
    # timeouts), every lookup that got through is kept and the next attempt asks only for
    # the accounts left. All-or-nothing, a batch of several accounts could retry forever.
    for client_acct_id, acct_no in sorted(accounts, key=lambda a: (a[0], a[1] or 0)):
        stored = client.stored_client_record_ids(
            accounts=[(client_acct_id, acct_no)], date_range=date_range
        )
        account_in_doubt = in_doubt.filter(client_acct_id=client_acct_id, acct_no=acct_no)
        now = timezone.now()
        with transaction.atomic():
            n = account_in_doubt.filter(client_record_id__in=stored).update(
                status=RecordStatus.COMPLETE, sent_at=None, completed_at=now, updated_at=now
            )
            # The rest were never stored: they go out again as ordinary PENDING records.
            account_in_doubt.update(sent_at=None, updated_at=now)
            refresh_batch_counts(batch_id)
        if n:
            metrics.RECORD_OUTCOMES.labels(RecordStatus.COMPLETE, "reconciled").inc(n)
        found += n
    if found:
        logger.warning(
            "batch %s: %d records in doubt were already in core Aria; marked COMPLETE",
            batch_id,
            found,
            extra={"batch_id": batch_id, "reconciled": found},
        )
    return found


def _send_pending(batch_id: int, client: AriaClient, reconciled: int) -> SyncResult:
    batch = AggregatedBatch.objects.get(pk=batch_id)
    sent_at = timezone.now()
    # Committed before the call: from here on a lost answer leaves these records in doubt.
    # The claim keeps the batch ours (reprocess skips claimed batches), so the records
    # marked here are exactly the ones loaded below.
    marked = UsageRecord.objects.filter(batch_id=batch_id, status=RecordStatus.PENDING).update(
        sent_at=sent_at, attempts=F("attempts") + 1, updated_at=sent_at
    )
    if not marked:
        _finish(batch_id)
        return SyncResult(Outcome.SYNCED, batch_id, reconciled=reconciled)
    records = list(
        UsageRecord.objects.filter(
            batch_id=batch_id, status=RecordStatus.PENDING, sent_at=sent_at
        )
        .order_by("id")
        # Light named rows instead of model instances: a third of a batch's Python time.
        .values_list(*USAGE_REC_FIELDS, named=True)
    )
    receipt = f"AUB{batch_id}-{batch.sync_attempts + 1}-{int(sent_at.timestamp())}"
    result = client.bulk_record_usage(
        usage_recs=[usage_rec(r) for r in records], client_receipt_id=receipt
    )
    completed, errors, unknown = _store_outcome(
        batch_id, records, result, sent_at=sent_at, client=client
    )
    return SyncResult(
        Outcome.SYNCED,
        batch_id,
        sent=len(records),
        completed=completed,
        errors=errors,
        reconciled=reconciled,
        detail=f"{len(unknown)} unknown error records" if unknown else "",
    )


@transaction.atomic
def _store_outcome(batch_id, records, result: BulkResult, *, sent_at: datetime, client):
    """Write each record's outcome, the batch counts and the activity entry, atomically."""
    now = timezone.now()
    sent = {r.client_record_id: r.id for r in records}
    by_error: dict[tuple[str, str], list[int]] = defaultdict(list)
    unknown = []
    if not result.ok and not result.record_errors:
        # A top-level error without error_records (e.g. 1004): the whole call failed.
        by_error[(result.error_code, result.error_msg)] = list(sent.values())
    for error in result.record_errors:
        if error.client_record_id in sent:
            by_error[(error.code, error.message)].append(sent[error.client_record_id])
        else:
            unknown.append(error.client_record_id)
    if unknown:
        logger.error(
            "batch %s: core Aria reported errors for client_record_ids not in the call: %s",
            batch_id,
            unknown[:20],
        )
    mine = UsageRecord.objects.filter(
        batch_id=batch_id, status=RecordStatus.PENDING, sent_at=sent_at
    )
    errored = 0
    errored_by_code: dict[str, int] = defaultdict(int)
    for (code, message), ids in by_error.items():
        n = mine.filter(id__in=ids).update(
            status=RecordStatus.ERROR,
            sync_error_code=code,
            sync_error_message=message,
            sent_at=None,
            updated_at=now,
        )
        errored += n
        errored_by_code[code] += n
    completed = mine.update(
        status=RecordStatus.COMPLETE,
        sync_error_code="",
        sync_error_message="",
        sent_at=None,
        completed_at=now,
        updated_at=now,
    )
    batch = refresh_batch_counts(batch_id, finished=True)
    call = client.last_call
    status = (
        SyncActivity.Status.COMPLETE
        if not errored
        else SyncActivity.Status.ERROR
        if not completed
        else SyncActivity.Status.PARTIAL
    )
    SyncActivity.objects.create(
        action_name="BULK_RECORD_USAGE",
        object_name=f"Batch {batch_id}",
        batch=batch,
        status=status,
        error_code="" if result.ok else result.error_code,
        error_message="" if result.ok else result.error_msg,
        record_count=len(records),
        duration_ms=call.duration_ms if call else None,
        details={
            "rest_call": "bulk_record_usage_m",
            "client_receipt_id": call.client_receipt_id if call else "",
            "sent": len(records),
            "completed": completed,
            "errors": errored,
            "unknown_error_records": unknown[:100],
            "client_record_ids": list(sent)[:2000],
        },
    )
    # Counted once the outcome commits, so a rolled-back store counts nothing.
    transaction.on_commit(lambda: _count_outcomes(completed, errored_by_code))
    logger.info(
        "batch %s synced: %d sent, %d complete, %d error (receipt %s, %s ms)",
        batch_id,
        len(records),
        completed,
        errored,
        call.client_receipt_id if call else "",
        call.duration_ms if call else "?",
        extra={
            "batch_id": batch_id,
            "client_receipt_id": call.client_receipt_id if call else "",
            "duration_ms": call.duration_ms if call else None,
            "sent": len(records),
            "completed": completed,
            "errors": errored,
        },
    )
    return completed, errored, unknown


def _count_outcomes(completed: int, errored_by_code: dict[str, int]) -> None:
    if completed:
        metrics.RECORD_OUTCOMES.labels(RecordStatus.COMPLETE, "0").inc(completed)
    for code, n in errored_by_code.items():
        if n:
            metrics.RECORD_OUTCOMES.labels(RecordStatus.ERROR, code).inc(n)


def _release_for_retry(batch_id: int, reason: str, client: AriaClient) -> None:
    now = timezone.now()
    batch = AggregatedBatch.objects.get(pk=batch_id)
    attempt = batch.sync_attempts + 1
    with transaction.atomic():
        AggregatedBatch.objects.filter(pk=batch_id, status=BatchStatus.IN_PROCESS).update(
            status=BatchStatus.PENDING,
            sync_attempts=attempt,
            next_retry_at=now + retry_delay(attempt),
            updated_at=now,
        )
        call = client.last_call
        SyncActivity.objects.create(
            action_name="BULK_RECORD_USAGE",
            object_name=f"Batch {batch_id}",
            batch=batch,
            status=SyncActivity.Status.ERROR,
            error_code="TRANSPORT",
            error_message=reason[:500],
            record_count=batch.pending_count,
            duration_ms=call.duration_ms if call else None,
            details={
                "rest_call": call.rest_call if call else "",
                "client_receipt_id": call.client_receipt_id if call else "",
                "retry_at": (now + retry_delay(attempt)).isoformat(),
                "attempt": attempt,
            },
        )
    logger.warning(
        "batch %s: transport failure (%s); retry %d after %s",
        batch_id,
        reason,
        attempt,
        retry_delay(attempt),
        extra={
            "batch_id": batch_id,
            "client_receipt_id": call.client_receipt_id if call else "",
            "duration_ms": call.duration_ms if call else None,
            "attempt": attempt,
        },
    )


def _finish(batch_id: int) -> None:
    with transaction.atomic():
        refresh_batch_counts(batch_id, finished=True)


def refresh_batch_counts(batch_id: int, *, finished: bool = False) -> AggregatedBatch:
    """Recompute a batch's counters from its records (one GROUP BY) and derive its status."""
    counts = dict(
        UsageRecord.objects.filter(batch_id=batch_id)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    batch = AggregatedBatch.objects.select_for_update().get(pk=batch_id)
    batch.pending_count = counts.get(RecordStatus.PENDING, 0)
    batch.completed_count = counts.get(RecordStatus.COMPLETE, 0)
    batch.error_count = counts.get(RecordStatus.ERROR, 0) + counts.get(RecordStatus.INCOMPLETE, 0)
    batch.ignored_count = counts.get(RecordStatus.IGNORED, 0)
    batch.total_count = sum(counts.values())
    now = timezone.now()
    if finished or batch.status != BatchStatus.IN_PROCESS:
        if batch.pending_count:
            batch.status = BatchStatus.PENDING
        elif batch.error_count:
            batch.status = BatchStatus.ERROR
        else:
            batch.status = BatchStatus.COMPLETE
    if finished:
        batch.synced_at = now
        batch.next_retry_at = None
    batch.updated_at = now
    batch.save()
    return batch


USAGE_REC_FIELDS = (
    "id", "client_record_id", "client_acct_id", "acct_no", "usage_type_code", "usage_type",
    "usage_units", "usage_date", "amount", "rate",
    "qualifier_1", "qualifier_2", "qualifier_3", "qualifier_4",
)


def usage_rec(record) -> dict:
    """Build one `usage_recs[]` element of bulk_record_usage_m from a record (or a row
    with the USAGE_REC_FIELDS attributes)."""
    rec: dict = {"client_record_id": record.client_record_id}
    if record.client_acct_id:
        rec["client_acct_id"] = record.client_acct_id
    else:
        rec["acct_no"] = record.acct_no
    if record.usage_type_code:
        rec["usage_type_code"] = record.usage_type_code
    else:
        rec["usage_type"] = record.usage_type
    rec["usage_units"] = _number(record.usage_units)
    rec["usage_date"] = _aria_date(record.usage_date)
    if record.amount is not None:
        rec["amt"] = _number(record.amount)
    elif record.rate is not None:
        rec["rate"] = _number(record.rate)
    for n in range(1, 5):
        if value := getattr(record, f"qualifier_{n}"):
            rec[f"qualifier_{n}"] = value
    return rec


def _number(value: Decimal):
    """Return a JSON number that is exactly the decimal, or its text when a float can't be."""
    value = value.normalize()
    as_float = float(value)
    return as_float if Decimal(repr(as_float)) == value else str(value)


def _aria_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(ARIA_DATE_FORMAT)
