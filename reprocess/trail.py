"""The usage trail: from what a customer or core Aria names (an event id, a client record id,
a receipt id, a batch id, an account) to the events, the record, the batch and the calls.

Every lookup goes through an index: events by event_id (unique) and by record (the
foreign key's index), records by client_record_id (unique) and by account, calls by batch
(the activity log's batch index, then its JSON details).
"""

from __future__ import annotations

import dataclasses
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
    if query.isdecimal() and len(query) < 19 and AggregatedBatch.objects.filter(
        pk=int(query)
    ).exists():
        matches.append(Match("batch", f"Batch {query}", batch_url(int(query))))
    account = {"client_acct_id": query}
    if query.isdecimal() and len(query) < 19:
        account = {"acct_no": int(query)}
    if UsageRecord.objects.filter(**account).exists() or (
        "acct_no" in account and UsageRecord.objects.filter(client_acct_id=query).exists()
    ):
        matches.append(Match(
            "account", f"Account {query}",
            reverse("console:records") + "?" + urlencode({"account": query}),
        ))
    return matches


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
    # What it left this record as: ERROR 1009, COMPLETE ("" when it cannot be told).
    record_outcome: str = ""

    @property
    def record_status(self) -> str:
        return self.record_outcome.split(" ", 1)[0]


def record_history(record: UsageRecord) -> list[HistoryEntry]:
    """Each call that carried the record and each reprocess run that queued it, in order."""
    calls = SyncActivity.objects.filter(
        batch_id=record.batch_id,
        action_name=SyncActivity.Action.BULK_RECORD_USAGE,
        details__client_record_ids__contains=[record.client_record_id],
    ).order_by("created_at", "id")
    entries = [
        HistoryEntry(
            at=call.created_at, kind="call",
            title=f"bulk_record_usage_m, receipt {call.details.get('client_receipt_id') or '—'}",
            outcome=call.status,
            detail=" ".join(filter(None, [call.error_code, call.error_message])),
            activity_id=call.pk,
        )
        for call in calls
    ]
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


def _with_record_outcome(entry: HistoryEntry, later: list[HistoryEntry],
                         record: UsageRecord) -> HistoryEntry:
    """A call's outcome for this record: what the next reprocess found it in, or for the
    last call the record's status now (the call's own status covers all its records)."""
    if entry.kind != "call":
        return entry
    following = next((e for e in later if e.kind == "reprocess"), None)
    if following:
        outcome = following.record_outcome
    elif any(e.kind == "call" for e in later) or record.status == "PENDING":
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
    """When the event's window closes for aggregation, under today's configuration."""
    config = AggregationConfig.load()
    start = window_boundary(now=event.usage_date, frequency=config.frequency,
                            grace=timedelta(0))
    return start + config.frequency + config.lateness_grace


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
