"""Check that events, records, batches and core Aria agree (manage.py reconcile_usage).

Every invariant is one set-based SQL statement that returns only the rows that break it
(at most PROBLEM_LIMIT named per check, then a count of the rest):

events ↔ records
  - each record's event_count, usage_units and amount equal the count and sums of the
    events linked to it (an event is linked to at most one record: a foreign key), OPEN
    records included;
  - each linked event shares its record's account, usage type, rate, pricing, grouped
    qualifiers, and lies in its record's window; a record in a batch has its batch's
    window, and only OPEN records have none;
  - no event is left without a record, and no record left OPEN, though its window had
    ended when the last aggregation run began (the run should have closed it).
batches ↔ records
  - total, pending, completed, error (ERROR + INCOMPLETE) and ignored counters equal the
    counts of the batch's records by status; no batch is empty;
  - the status follows from the counts (PENDING while any record is, else ERROR while any
    is, else COMPLETE); IN_PROCESS only while records are PENDING.
records ↔ core Aria (get_usage_history_m, by account and date range)
  - every COMPLETE record is held by core Aria, exactly once;
  - no record is held more than once (billed twice), and none that is ERROR, or PENDING
    and never sent, is held at all; core Aria holds no client_record_id unknown here.
  PENDING records with `sent_at` set are "in doubt" (the sync reconciles them before any
  re-send): they are counted, not reported.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from django.db import connection, transaction

from .billing import AriaClient, AriaTransportError, aria_date
from .models import (
    RECORD_COUNTS_SQL,
    STATUS_FROM_COUNTS_SQL,
    AggregatedBatch,
    AggregationConfig,
    UsageEvent,
    UsageRecord,
)

PROBLEM_LIMIT = 1000
_ARIA = "reconcile_aria_rows"
_INSERT_CHUNK = 10_000

_EVENT = UsageEvent._meta.db_table
_RECORD = UsageRecord._meta.db_table
_BATCH = AggregatedBatch._meta.db_table


@dataclasses.dataclass
class ReconcileReport:
    checked: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def reconcile_steps(*, since: datetime | None = None, check_aria: bool = True) -> int:
    """Return how many times `reconcile` will call `advance` (for a progress bar's total)."""
    steps = len(_DATABASE_CHECKS)
    if check_aria:
        steps += len(_accounts(since)) + 1
    return steps


def reconcile(
    *,
    since: datetime | None = None,
    client: AriaClient | None = None,
    check_aria: bool = True,
    advance: Callable[[int], None] | None = None,
) -> ReconcileReport:
    """Check every invariant (records of usage dates on/after `since` only, if given)."""
    advance = advance or (lambda n: None)
    report = ReconcileReport()
    scope = _Scope(since)
    # Each invariant is one statement, so it sees one snapshot even while workers sync.
    with connection.cursor() as cursor:
        for check in _DATABASE_CHECKS:
            check(cursor, scope, report)
            advance(1)
    if check_aria:
        _check_aria(scope, client or AriaClient(), report, advance)
    return report


class _Scope:
    """The `since` filter, as SQL conditions and parameters."""

    def __init__(self, since: datetime | None):
        self.since = since
        self.params = {
            "since": connection.ops.adapt_datetimefield_value(since) if since else None
        }

    def on(self, column: str) -> str:
        return f"{column} >= %(since)s" if self.since else "1 = 1"


def _report(cursor, report: ReconcileReport, sql: str, params: dict, line) -> int:
    """Run `sql` (rows that break an invariant), add one line per row; return the count."""
    cursor.execute(f"SELECT COUNT(*) FROM ({sql}) broken", params)
    total = cursor.fetchone()[0]
    if total:
        cursor.execute(f"{sql} ORDER BY 1 LIMIT {PROBLEM_LIMIT}", params)
        report.problems.extend(line(*row) for row in cursor.fetchall())
        if total > PROBLEM_LIMIT:
            report.problems.append(f"… and {total - PROBLEM_LIMIT} more of the kind above")
    return total


def _check_counts(cursor, scope: _Scope, report: ReconcileReport) -> None:
    """Count what is checked (the summary)."""
    cursor.execute(
        f"SELECT COUNT(*), COUNT(record_id) FROM {_EVENT} WHERE {scope.on('usage_date')}",
        scope.params,
    )
    events, linked = cursor.fetchone()
    report.checked.update(events=events, events_linked=linked, events_unlinked=events - linked)
    cursor.execute(
        f"SELECT status, COUNT(*), COUNT(sent_at) FROM {_RECORD} "
        f"WHERE {scope.on('usage_date')} GROUP BY status",
        scope.params,
    )
    by_status = {status: (n, sent) for status, n, sent in cursor.fetchall()}
    report.checked["records"] = sum(n for n, _ in by_status.values())
    for status in ("OPEN", "PENDING", "COMPLETE", "ERROR", "IGNORED", "INCOMPLETE"):
        report.checked[f"records_{status.lower()}"] = by_status.get(status, (0, 0))[0]
    report.checked["records_in_doubt"] = by_status.get("PENDING", (0, 0))[1]
    cursor.execute(
        f"SELECT COUNT(*) FROM {_BATCH} WHERE {scope.on('window_start')}", scope.params
    )
    report.checked["batches"] = cursor.fetchone()[0]


def _check_record_sums(cursor, scope: _Scope, report: ReconcileReport) -> None:
    """A record's count and sums are those of its linked events."""
    sql = f"""
        SELECT r.id, r.client_record_id, r.event_count, r.usage_units, r.amount,
               COALESCE(e.n, 0), e.units, e.amount
        FROM {_RECORD} r
        LEFT JOIN (
            SELECT record_id, COUNT(*) AS n, SUM(usage_units) AS units,
                   SUM(amount) AS amount, COUNT(amount) AS priced
            FROM {_EVENT} WHERE record_id IS NOT NULL GROUP BY record_id
        ) e ON e.record_id = r.id
        WHERE {scope.on('r.usage_date')}
          AND (COALESCE(e.n, 0) <> r.event_count
               OR e.units IS NULL OR ABS(e.units - r.usage_units) > 0.0000005
               OR e.priced NOT IN (0, e.n)
               OR (e.amount IS NULL) <> (r.amount IS NULL)
               OR ABS(e.amount - r.amount) > 0.005)
    """

    def line(_id, cid, count, units, amount, n, event_units, event_amount):
        return (
            f"record {cid}: {count} events, {units} units, amount {amount}; its linked "
            f"events: {n}, {event_units} units, amount {event_amount}"
        )

    report.checked["records_sums_wrong"] = _report(cursor, report, sql, scope.params, line)


def _check_event_links(cursor, scope: _Scope, report: ReconcileReport) -> None:
    """A linked event belongs in its record's group and its batch's window."""
    qualifiers = " AND ".join(
        f"(r.qualifier_{n} = '' OR r.qualifier_{n} = e.qualifier_{n})" for n in range(1, 5)
    )
    sql = f"""
        SELECT e.id, e.event_id, COALESCE(r.client_record_id, 'id ' || r.id), r.batch_id
        FROM {_EVENT} e
        JOIN {_RECORD} r ON r.id = e.record_id
        WHERE {scope.on('r.usage_date')}
          AND NOT (e.client_acct_id = r.client_acct_id
                   AND COALESCE(e.acct_no, 0) = COALESCE(r.acct_no, 0)
                   AND e.usage_type_code = r.usage_type_code
                   AND COALESCE(e.usage_type, 0) = COALESCE(r.usage_type, 0)
                   AND COALESCE(e.rate, -1) = COALESCE(r.rate, -1)
                   AND (e.amount IS NULL) = (r.amount IS NULL)
                   AND e.usage_date >= r.usage_date AND e.usage_date < r.window_end
                   AND {qualifiers})
    """

    def line(_id, event_id, cid, batch_id):
        batch = f"batch {batch_id}" if batch_id else "open"
        return (
            f"event {event_id} is linked to record {cid} ({batch}) but does not "
            "belong in its group or window"
        )

    report.checked["events_misplaced"] = _report(cursor, report, sql, scope.params, line)
    sql = f"""
        SELECT r.id, COALESCE(r.client_record_id, 'id ' || r.id), r.status, r.usage_date,
               r.window_end, b.id, b.window_start, b.window_end
        FROM {_RECORD} r LEFT JOIN {_BATCH} b ON b.id = r.batch_id
        WHERE {scope.on('r.usage_date')}
          AND CASE WHEN b.id IS NULL THEN r.status <> 'OPEN' OR r.client_record_id IS NOT NULL
                   ELSE r.status = 'OPEN' OR r.client_record_id IS NULL
                        OR r.usage_date <> b.window_start OR r.window_end > b.window_end END
    """

    def line(_id, cid, status, usage_date, window_end, batch_id, start, end):
        if batch_id is None:
            return f"record {cid} is {status} with no batch (only OPEN records have none)"
        return (
            f"record {cid} ({status}, window {usage_date} to {window_end}) does not fit "
            f"batch {batch_id} (window {start} to {end}, OPEN records have no batch)"
        )

    report.checked["records_misdated"] = _report(cursor, report, sql, scope.params, line)


def _check_unaggregated(cursor, scope: _Scope, report: ReconcileReport) -> None:
    """No event is without a record, and no record OPEN that the last run should have
    closed: its window had ended (lateness grace included) when that run began."""
    config = AggregationConfig.objects.filter(pk=1).first()
    if config is None or config.last_run_at is None:
        report.checked["events_left_behind"] = report.checked["records_left_open"] = 0
        return
    # Received after the last run (stored without a record by a process of the code before
    # records were opened at ingest, during a deploy): that run could not adopt it.
    sql = f"""
        SELECT id, event_id, usage_date FROM {_EVENT}
        WHERE record_id IS NULL AND received_at < %(last_run)s AND {scope.on('usage_date')}
    """

    def line(_id, event_id, usage_date):
        return f"event {event_id} ({usage_date}) is in no record"

    last_run = connection.ops.adapt_datetimefield_value(config.last_run_at)
    report.checked["events_left_behind"] = _report(
        cursor, report, sql, {**scope.params, "last_run": last_run}, line
    )
    params = {
        **scope.params,
        "horizon": connection.ops.adapt_datetimefield_value(
            config.last_run_at - config.lateness_grace
        ),
        "last_run": connection.ops.adapt_datetimefield_value(config.last_run_at),
    }
    # Opened after the last run (a late event): it waits for the next one, not a problem.
    sql = f"""
        SELECT id, usage_date, window_end FROM {_RECORD}
        WHERE batch_id IS NULL AND window_end <= %(horizon)s AND created_at < %(last_run)s
          AND {scope.on('usage_date')}
    """

    def line(record_id, usage_date, window_end):
        return (
            f"record id {record_id} (window {usage_date} to {window_end}) is still OPEN, "
            f"though its window had ended before the last aggregation run "
            f"({config.last_run_at.isoformat()})"
        )

    report.checked["records_left_open"] = _report(cursor, report, sql, params, line)


def _check_batches(cursor, scope: _Scope, report: ReconcileReport) -> None:
    """A batch's counters are its records' counts by status; its status follows from them."""
    # The recount's own rule (models.RECORD_COUNTS_SQL), checked against what is stored.
    counts = RECORD_COUNTS_SQL.format(where=scope.on("b.window_start"))
    sql = f"""
        SELECT b.id, b.status, b.total_count, b.pending_count, b.completed_count,
               b.error_count, b.ignored_count, c.total, c.pending, c.completed, c.errors,
               c.ignored, {STATUS_FROM_COUNTS_SQL}
        FROM {_BATCH} b JOIN ({counts}) c ON c.batch_id = b.id
        WHERE c.total = 0
           OR b.total_count <> c.total OR b.pending_count <> c.pending
           OR b.completed_count <> c.completed OR b.error_count <> c.errors
           OR b.ignored_count <> c.ignored
           OR (b.status <> {STATUS_FROM_COUNTS_SQL}
               AND NOT (b.status = 'IN_PROCESS' AND c.pending > 0))
    """

    def line(batch_id, status, *numbers):
        stored, actual, should_be = numbers[:5], numbers[5:10], numbers[10]
        names = ("total", "pending", "completed", "error", "ignored")
        if not actual[0]:
            return f"batch {batch_id} has no records"
        wrong = [
            f"{name} {have} (records say {want})"
            for name, have, want in zip(names, stored, actual, strict=True)
            if have != want
        ]
        if status != should_be and not (status == "IN_PROCESS" and actual[1]):
            wrong.append(f"status {status} (records say {should_be})")
        return f"batch {batch_id}: " + ", ".join(wrong)

    report.checked["batches_wrong"] = _report(cursor, report, sql, scope.params, line)


_DATABASE_CHECKS = (
    _check_counts,
    _check_record_sums,
    _check_event_links,
    _check_unaggregated,
    _check_batches,
)


def _accounts(since: datetime | None) -> list[tuple[str, int | None]]:
    records = UsageRecord.objects.filter(batch__isnull=False)
    if since:
        records = records.filter(usage_date__gte=since)
    # order_by(): the model ordering (id) would make DISTINCT keep one row per record.
    accounts = records.order_by().values_list("client_acct_id", "acct_no").distinct()
    return sorted(accounts, key=lambda a: (a[0], a[1] or 0))


def _check_aria(scope: _Scope, client: AriaClient, report, advance) -> None:
    """Compare what core Aria holds for our accounts with the records' statuses."""
    records = UsageRecord.objects.filter(batch__isnull=False)
    if scope.since:
        records = records.filter(usage_date__gte=scope.since)
    span = records.values_list("usage_date", flat=True)
    first, last = span.order_by("usage_date").first(), span.order_by("-usage_date").first()
    held: Counter[str] = Counter()
    unchecked = 0
    accounts = _accounts(scope.since)
    report.checked["aria_accounts"] = len(accounts)
    if first is not None:
        date_range = (aria_date(first), aria_date(last))
        for account in accounts:
            try:
                held.update(
                    client.stored_client_record_id_counts(accounts=[account], date_range=date_range)
                )
            except AriaTransportError as exc:
                unchecked += 1
                report.problems.append(
                    f"core Aria could not be checked for account {account[0] or account[1]}: {exc}"
                )
            advance(1)
    report.checked["aria_records"] = sum(held.values())
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {_ARIA}")
        cursor.execute(
            f"CREATE TEMPORARY TABLE {_ARIA} "
            "(client_record_id VARCHAR(50) PRIMARY KEY, copies INTEGER NOT NULL)"
        )
        rows = list(held.items())
        for start in range(0, len(rows), _INSERT_CHUNK):
            cursor.executemany(
                f"INSERT INTO {_ARIA} (client_record_id, copies) VALUES (%s, %s)",
                rows[start:start + _INSERT_CHUNK],
            )
        _compare_with_aria(cursor, scope, report, complete_ones=not unchecked)
        cursor.execute(f"DROP TABLE {_ARIA}")
    advance(1)


def _compare_with_aria(cursor, scope: _Scope, report: ReconcileReport, *,
                       complete_ones: bool) -> None:
    params = scope.params
    if not complete_ones:
        # An account went unchecked: its COMPLETE records would all look missing.
        report.checked["aria_missing"] = 0
    sql = f"""
        SELECT r.id, r.client_record_id FROM {_RECORD} r
        LEFT JOIN {_ARIA} a ON a.client_record_id = r.client_record_id
        WHERE {scope.on('r.usage_date')} AND r.status = 'COMPLETE' AND a.copies IS NULL
    """
    if complete_ones:
        report.checked["aria_missing"] = _report(
            cursor, report, sql, params,
            lambda _id, cid: f"record {cid} is COMPLETE here but core Aria does not hold it",
        )
    sql = f"""
        SELECT a.client_record_id, a.copies, COALESCE(r.status, '') FROM {_ARIA} a
        LEFT JOIN {_RECORD} r ON r.client_record_id = a.client_record_id
        WHERE a.copies > 1
    """
    report.checked["aria_duplicates"] = _report(
        cursor, report, sql, params,
        lambda cid, copies, status: (
            f"record {cid} ({status or 'unknown here'}) is held by core Aria {copies} times: "
            "billed more than once"
        ),
    )
    sql = f"""
        SELECT r.id, r.client_record_id, r.status, r.sync_error_code FROM {_RECORD} r
        JOIN {_ARIA} a ON a.client_record_id = r.client_record_id
        WHERE r.status IN ('ERROR', 'INCOMPLETE')
           OR (r.status = 'PENDING' AND r.sent_at IS NULL)
    """

    def line(_id, cid, status, code):
        state = f"ERROR {code}" if status == "ERROR" else f"{status}, never sent"
        if status == "INCOMPLETE":
            state = status
        return f"record {cid} is {state} here but core Aria holds it"

    report.checked["aria_unexpected"] = _report(cursor, report, sql, params, line)
    sql = f"""
        SELECT a.client_record_id FROM {_ARIA} a
        LEFT JOIN {_RECORD} r ON r.client_record_id = a.client_record_id
        WHERE r.id IS NULL
    """
    report.checked["aria_unknown"] = _report(
        cursor, report, sql, params,
        lambda cid: f"core Aria holds client_record_id {cid}, which no record here has",
    )

