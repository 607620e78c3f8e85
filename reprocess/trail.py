"""The usage trail: from what a customer or core Aria names (an event id, a client record id,
a receipt id, a batch id, an account) to the events, the record, the batch and the calls.

Every lookup goes through an index: events by event_id (unique) and by record (the
foreign key's index), records by client_record_id (unique) and by account (name or
number), calls by batch and by receipt id, reprocess entries by run id.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Sum
from django.urls import reverse
from django.utils.http import urlencode

from usage_sync.aggregation import window_boundary
from usage_sync.models import (
    AggregatedBatch,
    AggregationConfig,
    SyncActivity,
    UsageEvent,
    UsageRecord,
)

from .models import ReprocessRunRecord

# Longer than any identifier we store: nothing to look up.
MAX_QUERY_LENGTH = 100
# A batch id or an account number as people write them: ASCII digits, no leading zero,
# within a bigint (str.isdecimal would take Arabic-Indic or full-width digits too).
_NUMBER = re.compile(r"[1-9][0-9]{0,18}")
_BIGINT_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Match:
    kind: str  # "event", "record", "receipt", "batch" or "account"
    label: str
    url: str  # the console page it lands on


def find(query: str) -> list[Match]:
    """Everything `query` names exactly, most specific first (an empty list: nothing)."""
    query = query.strip()
    if not query or len(query) > MAX_QUERY_LENGTH or "\x00" in query:
        return []
    matches = []
    if record := UsageRecord.objects.filter(client_record_id=query).only("id").first():
        matches.append(Match("record", f"Record {query}", record_url(record.pk)))
    if UsageEvent.objects.filter(event_id=query).exists():
        matches.append(Match("event", f"Event {query}", event_url(query)))
    call = (
        SyncActivity.objects.filter(details__client_receipt_id=query, batch__isnull=False)
        .only("batch_id").first()
    )
    if call:
        matches.append(Match("receipt", f"Call {query} (batch {call.batch_id})",
                             batch_url(call.batch_id) + f"#call-{call.pk}"))
    number = _as_number(query)
    if number is not None and AggregatedBatch.objects.filter(pk=number).exists():
        matches.append(Match("batch", f"Batch {query}", batch_url(number)))
    if UsageRecord.objects.filter(client_acct_id=query).exists() or (
        number is not None and UsageRecord.objects.filter(acct_no=number).exists()
    ):
        matches.append(Match(
            "account", f"Account {query}",
            reverse("console:records") + "?" + urlencode({"account": query}),
        ))
    return matches


def _as_number(query: str) -> int | None:
    if not _NUMBER.fullmatch(query):
        return None
    number = int(query)
    return number if number <= _BIGINT_MAX else None


def record_url(record_id: int) -> str:
    return reverse("console:record", args=[record_id])


def event_url(event_id: str) -> str:
    return reverse("console:event") + "?" + urlencode({"id": event_id})


def batch_url(batch_id: int) -> str:
    return reverse("console:batch", args=[batch_id])


# --- a record's history -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    kind: str  # "call" or "reprocess"
    title: str
    outcome: str
    detail: str
    activity_id: int | None = None
    receipt_id: str = ""
    error_code: str = ""
    error_message: str = ""
    # What it left this record as: ERROR 1009, COMPLETE ("" when it cannot be told).
    record_outcome: str = ""
    # False for a call of the record's batch whose entry does not list the records it
    # carried (an undelivered call, or past the CALL_IDS_KEPT ids an entry keeps).
    listed: bool = True

    @property
    def record_status(self) -> str:
        return self.record_outcome.split(" ", 1)[0]


def record_history(record: UsageRecord) -> list[HistoryEntry]:
    """Each call that carried the record (or may have) and each reprocess run that queued
    it, in order."""
    if record.batch_id is None:
        return []  # OPEN: in no batch yet, so never sent nor reprocessed
    # A batch has a handful of calls: read them all (over the batch index) and pick ours.
    calls = SyncActivity.objects.filter(
        batch_id=record.batch_id, action_name=SyncActivity.Action.BULK_RECORD_USAGE,
    ).order_by("created_at", "id")
    entries = []
    for call in calls:
        listed = _lists(call, record)
        if listed is False or (listed is None and not _may_carry(call, record)):
            continue
        receipt = call.details.get("client_receipt_id") or ""
        detail = " ".join(filter(None, [call.error_code, call.error_message]))
        if listed is None:
            detail = " ".join(filter(None, [
                detail, "(This entry does not list the records the call carried.)"]))
        entries.append(HistoryEntry(
            at=call.created_at, kind="call",
            title=f"{call.details.get('rest_call') or 'bulk_record_usage_m'}, "
                  f"receipt {receipt or '—'}",
            outcome=call.status, detail=detail, activity_id=call.pk, receipt_id=receipt,
            error_code=call.error_code, error_message=call.error_message,
            listed=listed is True,
        ))
    queued = (
        ReprocessRunRecord.objects.filter(record=record).select_related("run")
        .order_by("run__created_at")
    )
    entries += [
        HistoryEntry(
            at=link.run.created_at, kind="reprocess",
            title=f"Reprocess run {link.run.pk} ({link.run.object_name}) by {link.run.actor}",
            outcome=f"queued from {link.previous_status}",
            record_outcome=" ".join(filter(None, [link.previous_status,
                                                  link.previous_error_code])),
            error_code=link.previous_error_code, error_message=link.previous_error_message,
            detail=" ".join(filter(None, [
                link.previous_error_code, link.previous_error_message,
                f"reason: {link.run.reason}" if link.run.reason else "",
            ])),
        )
        for link in queued
    ]
    entries.sort(key=lambda e: e.at)
    return [_with_record_outcome(entry, entries[i + 1:], record)
            for i, entry in enumerate(entries)]


def _lists(call: SyncActivity, record: UsageRecord) -> bool | None:
    """Whether the call's entry names the record: True, False, or None (it cannot tell)."""
    ids = call.details.get("client_record_ids")
    if ids is None:
        return None
    if record.client_record_id in ids:
        return True
    # An entry keeps the first CALL_IDS_KEPT ids of a call; a longer one may have carried it.
    return None if len(ids) < call.details.get("sent", len(ids)) else False


def _may_carry(call: SyncActivity, record: UsageRecord) -> bool:
    """An unlisted call of the batch could have carried the record unless the record was
    already settled by then."""
    return record.completed_at is None or call.created_at <= record.completed_at


def _with_record_outcome(entry: HistoryEntry, later: list[HistoryEntry],
                         record: UsageRecord) -> HistoryEntry:
    """A listed call's outcome for this record: what the reprocess right after it found
    the record in, or for the last entry the record's status now (the call's own status
    covers all its records). Another call in between leaves it untold."""
    if entry.kind != "call" or not entry.listed:
        return entry
    following = later[0] if later else None
    if following and following.kind == "reprocess":
        outcome = following.record_outcome
    elif following or record.status == "PENDING":
        return entry
    else:
        outcome = " ".join(filter(None, [record.status, record.sync_error_code]))
    return dataclasses.replace(entry, record_outcome=outcome)


@dataclasses.dataclass(frozen=True)
class EventSums:
    events: int
    units: Decimal
    amount: Decimal | None

    def agree_with(self, record: UsageRecord) -> bool:
        return (self.events, self.units, self.amount) == (
            record.event_count, record.usage_units, record.amount
        )


def event_sums(record: UsageRecord) -> EventSums:
    """The count and sums of the events linked to the record (over the record link index)."""
    sums = UsageEvent.objects.filter(record=record).aggregate(
        events=Count("id"), units=Sum("usage_units"), amount=Sum("amount")
    )
    return EventSums(sums["events"], sums["units"] or Decimal(0), sums["amount"])


# --- an event's place ---------------------------------------------------------------------


def window_closes_at(event: UsageEvent) -> datetime:
    """When the event's window closes for aggregation: its open record's window end, or
    (for an event stored without a record) its window under the rule for its date, plus
    the lateness grace."""
    config = AggregationConfig.load()
    if event.record_id:
        return event.record.window_end + config.lateness_grace
    frequency = timedelta(minutes=config.rule_at(event.usage_date).frequency_minutes)
    start = window_boundary(now=event.usage_date, frequency=frequency, grace=timedelta(0))
    return start + frequency + config.lateness_grace


# --- a batch's timeline -------------------------------------------------------------------


def batch_timeline(batch: AggregatedBatch) -> list[SyncActivity]:
    """The batch's calls and reprocess runs, oldest first: its activity, and the runs of
    every level that queued one of its records."""
    runs = (
        ReprocessRunRecord.objects.filter(record__batch=batch)
        .values_list("run_id", flat=True).distinct()
    )
    reprocesses = SyncActivity.objects.filter(
        action_name=SyncActivity.Action.REPROCESS, details__run_id__in=list(runs)
    )
    own = SyncActivity.objects.filter(batch=batch)
    return sorted({*own, *reprocesses}, key=lambda a: (a.created_at, a.pk))
