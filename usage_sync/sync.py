"""Send one aggregated batch to core Aria and store each record's outcome.

The rules that protect the money (README, "How the sync protects the money"):
- only PENDING records that are not in doubt are sent; COMPLETE and IGNORED never again;
- a record goes out with `sent_at` set and committed first; if the call's outcome is
  unknown (timeout, HTTP 5xx, an answer that cannot be mapped, a crash), the record stays
  PENDING with `sent_at` set: "in doubt". Core Aria may still be storing it, so nothing
  happens to it until SYNC_IN_DOUBT_SETTLE_SECONDS have passed since it was sent; then it
  is looked up with get_usage_history_m: found, it is COMPLETE; not found, it is sent again
  (or, after an answer that could not be mapped, ERROR with that answer's code);
- results map back only through `out_client_record_id` (answers.py);
- the batch is held by a claim (claims.py) that every write checks, so a second delivery,
  or a worker that lost its claim mid-call, writes nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Max, Min
from django.utils import timezone

from . import metrics
from .answers import MappedAnswer, map_answer
from .billing import USAGE_REC_FIELDS, AriaClient, AriaTransportError, aria_date, usage_rec
from .claims import Claim, ClaimLost
from .models import AggregatedBatch, RecordStatus, SyncActivity, UsageRecord

logger = logging.getLogger(__name__)

# A call's activity entry lists the first ids of the records it carried, enough for most
# batches without storing megabytes per call; a record's history reads them back.
CALL_IDS_KEPT = 2000


class Outcome(enum.StrEnum):
    SYNCED = "synced"
    SKIPPED = "skipped"  # nothing pending, gone, or another worker holds the batch
    RETRY = "retry"  # transport failure: the batch is released for a later retry
    WAITING = "waiting"  # records in doubt: the batch waits for them to settle


@dataclasses.dataclass(frozen=True)
class SyncResult:
    outcome: Outcome
    batch_id: int
    sent: int = 0
    completed: int = 0
    errors: int = 0
    reconciled: int = 0
    detail: str = ""


class _CallFailed(AriaTransportError):
    """A bulk call's transport failure, with the records it carried (none if undelivered)."""

    def __init__(self, message: str, *, sent_ids: list[str]):
        super().__init__(message, delivered=bool(sent_ids))
        self.sent_ids = sent_ids


def settle_window() -> timedelta:
    """How long records in doubt are left alone before they are looked up in core Aria."""
    return timedelta(seconds=settings.SYNC_IN_DOUBT_SETTLE_SECONDS)


def retry_delay(attempt: int) -> timedelta:
    """Exponential backoff for transport failures: 5 s, 10 s, 20 s … capped at 10 min."""
    base = settings.SYNC_RETRY_BASE_SECONDS
    return timedelta(seconds=min(base * 2 ** max(attempt - 1, 0), 600))


def sync_batch(*, batch_id: int, client: AriaClient | None = None) -> SyncResult:
    """Claim the batch, settle records in doubt, send the PENDING ones, store outcomes."""
    client = client or AriaClient()
    claim = Claim.take(batch_id)
    if claim is None:
        return SyncResult(Outcome.SKIPPED, batch_id)
    try:
        if settles_at := _in_doubt_until(batch_id):
            with claim.fenced():
                claim.release(retry_at=settles_at)
            logger.info("batch %s waits until %s for records in doubt to settle", batch_id,
                        settles_at.isoformat(), extra={"batch_id": batch_id})
            return SyncResult(Outcome.WAITING, batch_id, detail=f"settles at {settles_at}")
        reconciled = _reconcile_in_doubt(claim, client)
        return _send_pending(claim, client, reconciled)
    except ClaimLost:
        logger.warning("batch %s: the claim was taken over; stopping without writing",
                       batch_id, extra={"batch_id": batch_id})
        return SyncResult(Outcome.SKIPPED, batch_id, detail="claim lost")
    except AriaTransportError as exc:
        sent_ids = exc.sent_ids if isinstance(exc, _CallFailed) else None
        _release_for_retry(claim, str(exc), client, error_code="TRANSPORT", sent_ids=sent_ids)
        return SyncResult(Outcome.RETRY, batch_id, detail=str(exc))
    except Exception as exc:
        # Records sent stay in doubt (sent_at set): they are reconciled before any re-send.
        logger.exception("sync of batch %s failed unexpectedly", batch_id)
        if not connection.in_atomic_block:
            # A dropped connection is useless now; the ORM opens a fresh one on next use.
            connection.close_if_unusable_or_obsolete()
        _release_for_retry(claim, f"{type(exc).__name__}: {exc}", client,
                           error_code="UNEXPECTED")
        raise


def _in_doubt(batch_id: int):
    return UsageRecord.objects.filter(
        batch_id=batch_id, status=RecordStatus.PENDING, sent_at__isnull=False
    )


def _in_doubt_until(batch_id: int) -> datetime | None:
    """When the batch's records in doubt will have settled, if that is still to come."""
    last_sent = _in_doubt(batch_id).aggregate(last=Max("sent_at"))["last"]
    if last_sent is None:
        return None
    settles_at = last_sent + settle_window()
    return settles_at if settles_at > timezone.now() else None


def _reconcile_in_doubt(claim: Claim, client: AriaClient) -> int:
    """Settle the batch's records in doubt with core Aria; return how many it held."""
    in_doubt = _in_doubt(claim.batch_id)
    span = in_doubt.aggregate(first=Min("usage_date"), last=Max("usage_date"))
    if span["first"] is None:
        return 0
    # order_by(): the model's ordering (id) would make DISTINCT return one row per record.
    accounts = in_doubt.order_by().values_list("client_acct_id", "acct_no").distinct()
    date_range = (aria_date(span["first"]), aria_date(span["last"] + timedelta(days=1)))
    found = 0
    # One account at a time, each committed: when core Aria fails now and then (flapping,
    # timeouts), every lookup that got through is kept and the next attempt asks only for
    # the accounts left. All-or-nothing, a batch of several accounts could retry forever.
    for client_acct_id, acct_no in sorted(accounts, key=lambda a: (a[0], a[1] or 0)):
        stored = client.stored_client_record_ids(
            accounts=[(client_acct_id, acct_no)], date_range=date_range, before_call=claim.renew
        )
        account_in_doubt = in_doubt.filter(client_acct_id=client_acct_id, acct_no=acct_no)
        now = timezone.now()
        with claim.fenced():
            held = account_in_doubt.filter(client_record_id__in=stored).update(
                status=RecordStatus.COMPLETE, sync_error_code="", sync_error_message="",
                sent_at=None, completed_at=now, updated_at=now,
            )
            # Not held, after an answer that could not be mapped: core Aria refused them.
            refused = account_in_doubt.exclude(sync_error_code="").update(
                status=RecordStatus.ERROR, sent_at=None, updated_at=now
            )
            # Not held after a lost answer: never stored, so they go out again.
            account_in_doubt.update(sent_at=None, updated_at=now)
            AggregatedBatch.objects.filter(id=claim.batch_id).recount()
        if held:
            metrics.RECORD_OUTCOMES.labels(RecordStatus.COMPLETE, "reconciled").inc(held)
        if refused:
            metrics.RECORD_OUTCOMES.labels(RecordStatus.ERROR, "reconciled").inc(refused)
        found += held
    if found:
        logger.warning(
            "batch %s: %d records in doubt were already in core Aria; marked COMPLETE",
            claim.batch_id, found, extra={"batch_id": claim.batch_id, "reconciled": found},
        )
    return found


def _send_pending(claim: Claim, client: AriaClient, reconciled: int) -> SyncResult:
    batch_id = claim.batch_id
    sent_at = timezone.now()
    # Committed before the call, with the claim renewed: from here on a lost answer leaves
    # these records in doubt. Records in doubt are never among them.
    with claim.fenced() as batch:
        marked = UsageRecord.objects.filter(
            batch_id=batch_id, status=RecordStatus.PENDING, sent_at__isnull=True
        ).update(sent_at=sent_at, attempts=F("attempts") + 1, updated_at=sent_at)
        AggregatedBatch.objects.filter(id=batch_id).update(sync_started_at=sent_at)
        if not marked:
            claim.release(finished=True)
            return SyncResult(Outcome.SYNCED, batch_id, reconciled=reconciled)
    records = list(
        UsageRecord.objects.filter(batch_id=batch_id, status=RecordStatus.PENDING,
                                   sent_at=sent_at)
        .order_by("id")
        # Light named rows instead of model instances: a third of a batch's Python time.
        .values_list(*USAGE_REC_FIELDS, named=True)
    )
    receipt = f"AUB{batch_id}-{batch.sync_attempts + 1}-{int(sent_at.timestamp())}"
    usage_recs = [usage_rec(r) for r in records]
    try:
        _check_still_in_time(sent_at, client)
        result = client.bulk_record_usage(usage_recs=usage_recs, client_receipt_id=receipt)
    except AriaTransportError as exc:
        if not exc.delivered:
            # Nothing reached core Aria: these records are not in doubt.
            with claim.fenced():
                UsageRecord.objects.filter(
                    batch_id=batch_id, status=RecordStatus.PENDING, sent_at=sent_at
                ).update(sent_at=None)
        raise _CallFailed(str(exc), sent_ids=[r.client_record_id for r in records]
                          if exc.delivered else []) from exc
    sent = {r.client_record_id: r.id for r in records}
    answer = map_answer(result, sent)
    completed, errors = _store_outcome(claim, answer, sent_at=sent_at, client=client,
                                       sent=list(sent), error=(result.error_code,
                                                               result.error_msg))
    return SyncResult(
        Outcome.WAITING if answer.in_doubt else Outcome.SYNCED,
        batch_id,
        sent=len(records),
        completed=completed,
        errors=errors,
        reconciled=reconciled,
        detail=f"{len(answer.unmapped)} items could not be mapped" if answer.in_doubt else "",
    )


def _check_still_in_time(sent_at: datetime, client: AriaClient) -> None:
    """Refuse to send records marked sent longer ago than one call may take.

    The settle window counts from `sent_at`. A process paused between marking and sending
    (a frozen VM, a stop-the-world pause) might otherwise send records that another worker
    has meanwhile settled, found missing and sent again.
    """
    late = timezone.now() - sent_at
    if late > timedelta(seconds=client.timeout):
        raise AriaTransportError(
            f"bulk_record_usage_m not sent: {late.total_seconds():.0f} s passed since the "
            "records were marked sent", delivered=False,
        )


def _store_outcome(claim: Claim, answer: MappedAnswer, *, sent_at: datetime,
                   client: AriaClient, sent: list[str], error: tuple[str, str]
                   ) -> tuple[int, int]:
    """Write each record's outcome, the batch counts and the activity entry, atomically."""
    now = timezone.now()
    mine = UsageRecord.objects.filter(
        batch_id=claim.batch_id, status=RecordStatus.PENDING, sent_at=sent_at
    )
    errored_by_code: dict[str, int] = {}
    with claim.fenced():
        by_failure: dict[tuple[str, str], list[int]] = {}
        for record_id, failure in answer.failed.items():
            by_failure.setdefault(failure, []).append(record_id)
        for (code, message), ids in by_failure.items():
            n = mine.filter(id__in=ids).update(
                status=RecordStatus.ERROR, sync_error_code=code, sync_error_message=message,
                sent_at=None, updated_at=now,
            )
            errored_by_code[code] = errored_by_code.get(code, 0) + n
        if answer.in_doubt:
            # sent_at stays: in doubt until core Aria is asked, once they have settled.
            code, message = answer.doubt
            completed = 0
            mine.update(sync_error_code=code, sync_error_message=message, updated_at=now)
            claim.release(retry_at=sent_at + settle_window())
        else:
            completed = mine.update(
                status=RecordStatus.COMPLETE, sync_error_code="", sync_error_message="",
                sent_at=None, completed_at=now, updated_at=now,
            )
            claim.release(finished=True)
        errored = sum(errored_by_code.values())
        _log_call(claim, client, sent_ids=sent, completed=completed, errored=errored,
                  error=error, answer=answer, retry_at=sent_at + settle_window())
        # Counted once the outcome commits, so a rolled-back store counts nothing.
        transaction.on_commit(lambda: _count_outcomes(completed, errored_by_code))
    return completed, errored


def _log_call(claim: Claim, client: AriaClient, *, sent_ids: list[str], completed: int,
              errored: int, error: tuple[str, str], answer: MappedAnswer,
              retry_at: datetime) -> None:
    """The call's activity-log entry and log line."""
    batch_id = claim.batch_id
    sent = len(sent_ids)
    call = client.last_call
    receipt = call.client_receipt_id if call else ""
    duration_ms = call.duration_ms if call else None
    if answer.in_doubt:
        status = SyncActivity.Status.ERROR
        code, message = answer.doubt
        message = (
            f"The answer could not be mapped record by record ({len(answer.unmapped)} "
            f"items); {sent - errored} records are in doubt until {retry_at:%Y-%m-%d %H:%M:%S} "
            f"UTC, then looked up in core Aria. Core Aria said: {message}"
        )
    else:
        status = (SyncActivity.Status.COMPLETE if not errored
                  else SyncActivity.Status.ERROR if not completed
                  else SyncActivity.Status.PARTIAL)
        code, message = ("", "") if error[0] == "0" else error
    SyncActivity.objects.create(
        action_name=SyncActivity.Action.BULK_RECORD_USAGE,
        object_name=f"Batch {batch_id}",
        batch_id=batch_id,
        status=status,
        error_code=code,
        error_message=message,
        record_count=sent,
        duration_ms=duration_ms,
        details={
            "rest_call": "bulk_record_usage_m",
            "client_receipt_id": receipt,
            "sent": sent,
            "completed": completed,
            "errors": errored,
            "in_doubt": sent - completed - errored if answer.in_doubt else 0,
            "unmapped": answer.unmapped[:100],
            # Which records the call carried: a record's history reads it back.
            "client_record_ids": sent_ids[:CALL_IDS_KEPT],
        },
    )
    if answer.in_doubt:
        logger.error(
            "batch %s: core Aria's answer could not be mapped (%s); %d records in doubt",
            batch_id, "; ".join(answer.unmapped[:5]), sent - errored,
            extra={"batch_id": batch_id, "client_receipt_id": receipt},
        )
    logger.info(
        "batch %s synced: %d sent, %d complete, %d error (receipt %s, %s ms; claimed %s ms "
        "after its publish)",
        batch_id, sent, completed, errored, receipt, duration_ms, claim.publish_to_claim_ms,
        extra={"batch_id": batch_id, "client_receipt_id": receipt, "duration_ms": duration_ms,
               "sent": sent, "completed": completed, "errors": errored,
               "publish_to_claim_ms": claim.publish_to_claim_ms},
    )


def _count_outcomes(completed: int, errored_by_code: dict[str, int]) -> None:
    if completed:
        metrics.RECORD_OUTCOMES.labels(RecordStatus.COMPLETE, "0").inc(completed)
    for code, n in errored_by_code.items():
        if n:
            metrics.RECORD_OUTCOMES.labels(RecordStatus.ERROR, code).inc(n)


def _release_for_retry(claim: Claim, reason: str, client: AriaClient, *, error_code: str,
                       sent_ids: list[str] | None = None) -> None:
    """Give the batch back with a backoff; records in doubt push the retry past their
    settle window. Best effort: if the database is away, the stale claim is the fallback."""
    now = timezone.now()
    try:
        with claim.fenced() as batch:
            attempt = batch.sync_attempts + 1
            retry_at = now + retry_delay(attempt)
            if settles_at := _in_doubt_until(claim.batch_id):
                retry_at = max(retry_at, settles_at)
            claim.release(retry_at=retry_at, attempts=attempt)
            call = client.last_call
            SyncActivity.objects.create(
                action_name=SyncActivity.Action.BULK_RECORD_USAGE,
                object_name=f"Batch {claim.batch_id}",
                batch_id=claim.batch_id,
                status=SyncActivity.Status.ERROR,
                error_code=error_code,
                error_message=reason[:500],
                record_count=batch.pending_count,
                duration_ms=call.duration_ms if call else None,
                details={
                    "rest_call": call.rest_call if call else "",
                    "client_receipt_id": call.client_receipt_id if call else "",
                    "retry_at": retry_at.isoformat(),
                    "attempt": attempt,
                    # What a bulk call carried, as in _log_call (nothing if undelivered).
                    **({"sent": len(sent_ids), "client_record_ids": sent_ids[:CALL_IDS_KEPT]}
                       if sent_ids is not None else {}),
                },
            )
    except ClaimLost:
        logger.warning("batch %s: failed (%s) after its claim was taken over", claim.batch_id,
                       reason, extra={"batch_id": claim.batch_id})
        return
    except Exception:
        logger.exception("batch %s: could not release the claim after a failure; it is "
                         "retried once the claim is stale", claim.batch_id)
        return
    logger.warning(
        "batch %s: %s (%s); retry %d at %s", claim.batch_id, error_code.lower(), reason,
        attempt, retry_at.isoformat(),
        extra={"batch_id": claim.batch_id, "attempt": attempt,
               "client_receipt_id": call.client_receipt_id if call else "",
               "duration_ms": call.duration_ms if call else None},
    )
