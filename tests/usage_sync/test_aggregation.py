import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connections, transaction
from django.db.models import F, Sum

from tests.factories import UsageEventFactory
from usage_sync.aggregation import aggregate_usage, window_boundary
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import (
    AggregatedBatch,
    AggregationConfig,
    RecordStatus,
    SyncActivity,
    UsageEvent,
    UsageRecord,
)

NOW = datetime(2026, 11, 21, 0, 10, tzinfo=UTC)
DAY = datetime(2026, 11, 20, tzinfo=UTC)

pytestmark = pytest.mark.django_db


def at(hour: int, minute: int = 0) -> datetime:
    return DAY + timedelta(hours=hour, minutes=minute)


def configure(**fields) -> AggregationConfig:
    config = AggregationConfig.load()
    for name, value in fields.items():
        setattr(config, name, value)
    config.save()
    return config


def assert_invariants():
    """Every event linked once; records sum their events; batch counters match records."""
    assert not UsageEvent.objects.filter(record__isnull=True, usage_date__lt=at(23)).exists()
    for record in UsageRecord.objects.all():
        events = record.events.aggregate(units=Sum("usage_units"), amount=Sum("amount"))
        assert record.usage_units == events["units"]
        assert record.amount == events["amount"]
        assert record.event_count == record.events.count()
    for batch in AggregatedBatch.objects.all():
        assert batch.total_count == batch.records.count()
        assert batch.pending_count == batch.records.filter(status=RecordStatus.PENDING).count()


def test_window_boundary_is_the_start_of_the_first_open_window():
    hour = timedelta(hours=1)
    assert window_boundary(now=at(10, 30), frequency=hour, grace=timedelta(0)) == at(10)
    # 10:03 with 5 minutes of grace: the 09:00–10:00 window is not closed yet.
    assert window_boundary(now=at(10, 3), frequency=hour, grace=timedelta(minutes=5)) == at(9)
    quarter = timedelta(minutes=15)
    assert window_boundary(now=at(10, 44), frequency=quarter, grace=timedelta(0)) == at(10, 30)


def test_it_sums_events_by_window_account_and_usage_type():
    configure(frequency_minutes=60)
    for minute, units in ((0, "1.5"), (20, "2.25"), (59, "3")):
        UsageEventFactory(client_acct_id="A", usage_date=at(9, minute), usage_units=units)
    UsageEventFactory(client_acct_id="B", usage_date=at(9, 5), usage_units="7")
    UsageEventFactory(client_acct_id="A", usage_date=at(10, 0), usage_units="11")

    result = aggregate_usage(now=NOW)

    assert (result.events, result.records) == (5, 3)
    record = UsageRecord.objects.get(client_acct_id="A", usage_date=at(9))
    assert record.usage_units == Decimal("6.75")
    assert record.event_count == 3
    assert record.status == RecordStatus.PENDING
    assert record.batch.window_start == at(9)
    assert record.batch.window_end == at(10)
    assert_invariants()


def test_only_closed_windows_are_aggregated_after_the_grace_period():
    configure(frequency_minutes=60, lateness_grace_minutes=15)
    UsageEventFactory(usage_date=at(22, 30))
    UsageEventFactory(usage_date=at(23, 30))  # window ends 00:00, grace runs to 00:15

    result = aggregate_usage(now=NOW)

    assert result.events == 1
    waiting = UsageEvent.objects.get(usage_date=at(23, 30)).record
    assert (waiting.status, waiting.batch, waiting.window_end) == ("OPEN", None, at(24))
    assert aggregate_usage(now=NOW + timedelta(minutes=5)).events == 1


def test_batches_hold_at_most_batch_size_records_of_one_window():
    configure(frequency_minutes=60, batch_size=3)
    for n in range(7):
        UsageEventFactory(client_acct_id=f"ACCT-{n}", usage_date=at(9, 10))
    UsageEventFactory(client_acct_id="ACCT-0", usage_date=at(10, 10))

    result = aggregate_usage(now=NOW)

    assert result.batches == 4
    sizes = sorted(
        AggregatedBatch.objects.filter(window_start=at(9)).values_list("sequence", "total_count")
    )
    assert sizes == [(1, 3), (2, 3), (3, 1)]
    assert_invariants()


def test_late_events_go_into_a_new_batch_of_their_window_and_are_counted_once():
    configure(frequency_minutes=60)
    UsageEventFactory(client_acct_id="A", usage_date=at(9, 10), usage_units="5")
    aggregate_usage(now=NOW)

    UsageEventFactory(client_acct_id="A", usage_date=at(9, 50), usage_units="2")
    result = aggregate_usage(now=NOW + timedelta(hours=1))

    assert (result.events, result.records, result.batches) == (1, 1, 1)
    late = AggregatedBatch.objects.get(pk=result.batch_ids[0])
    assert (late.window_start, late.sequence) == (at(9), 2)
    assert sorted(UsageRecord.objects.values_list("usage_units", flat=True)) == [2, 5]
    assert aggregate_usage(now=NOW + timedelta(hours=2)).events == 0
    assert_invariants()


def test_qualifiers_split_records_only_when_configured():
    UsageEventFactory(client_acct_id="A", usage_date=at(9), qualifier_1="eu")
    UsageEventFactory(client_acct_id="A", usage_date=at(9), qualifier_1="us")
    UsageEventFactory(client_acct_id="B", usage_date=at(9), qualifier_1="eu")
    UsageEventFactory(client_acct_id="B", usage_date=at(9), qualifier_1="us")
    configure(frequency_minutes=60, group_by_qualifier_1=True)
    UsageEvent.objects.filter(client_acct_id="B").update(usage_date=at(9, 30))

    assert aggregate_usage(now=NOW).records == 4
    assert set(UsageRecord.objects.values_list("qualifier_1", flat=True)) == {"eu", "us"}

    configure(group_by_qualifier_1=False)
    UsageEventFactory(client_acct_id="C", usage_date=at(9), qualifier_1="eu")
    UsageEventFactory(client_acct_id="C", usage_date=at(9), qualifier_1="us")
    aggregate_usage(now=NOW)
    assert UsageRecord.objects.get(client_acct_id="C").qualifier_1 == ""
    assert_invariants()


def test_priced_and_rated_events_and_different_rates_never_share_a_record():
    configure(frequency_minutes=60)
    common = {"client_acct_id": "A", "usage_date": at(9)}
    UsageEventFactory(**common, amount=Decimal("2.50"))
    UsageEventFactory(**common, amount=Decimal("1.25"))
    UsageEventFactory(**common)
    UsageEventFactory(**common, rate=Decimal("0.10000"))
    UsageEventFactory(**common, rate=Decimal("0.20000"))

    assert aggregate_usage(now=NOW).records == 4
    assert UsageRecord.objects.get(amount__isnull=False).amount == Decimal("3.75")
    assert set(UsageRecord.objects.values_list("rate", flat=True)) == {
        None,
        Decimal("0.1"),
        Decimal("0.2"),
    }
    assert_invariants()


def test_account_numbers_and_usage_type_numbers_group_like_codes():
    configure(frequency_minutes=60)
    for _ in range(2):
        UsageEventFactory(client_acct_id="", acct_no=42, usage_type_code="", usage_type=7,
                          usage_date=at(9))
    UsageEventFactory(client_acct_id="", acct_no=43, usage_type_code="", usage_type=7,
                      usage_date=at(9))

    assert aggregate_usage(now=NOW).records == 2
    assert UsageRecord.objects.get(acct_no=42).event_count == 2
    assert_invariants()


def test_client_record_ids_are_unique_short_and_derived_from_batch_and_position():
    configure(frequency_minutes=15, batch_size=2)
    for n in range(9):
        UsageEventFactory(client_acct_id=f"ACCT-{n}", usage_date=at(n % 3, 1))

    aggregate_usage(now=NOW)

    ids = list(UsageRecord.objects.values_list("client_record_id", "batch_id"))
    assert len({cid for cid, _ in ids}) == 9
    assert all(len(cid) <= 50 and cid.startswith(f"AU{batch}-") for cid, batch in ids)


def test_a_run_is_logged_in_the_activity_log_and_an_empty_run_is_not():
    UsageEventFactory(usage_date=at(9))

    aggregate_usage(now=NOW, actor="tester")
    aggregate_usage(now=NOW, actor="tester")

    entry = SyncActivity.objects.get()
    assert (entry.action_name, entry.status, entry.record_count, entry.actor) == (
        "AGGREGATE", "COMPLETE", 1, "tester"
    )
    assert entry.details["events"] == 1


def test_batch_counts_add_up_by_database_constraint():
    UsageEventFactory(usage_date=at(9))
    aggregate_usage(now=NOW)

    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        AggregatedBatch.objects.update(pending_count=F("pending_count") + 1)


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_runs_never_double_count():
    configure(frequency_minutes=15, batch_size=50)
    UsageEvent.objects.bulk_create(
        UsageEvent(
            event_id=f"c-{n}",
            client_acct_id=f"ACCT-{n % 40}",
            usage_type_code=f"T{n % 3}",
            usage_units=Decimal(n % 13) / 4,
            usage_date=at(n % 20, n % 60),
        )
        for n in range(6000)
    )
    barrier = threading.Barrier(4)
    results, errors = [], []

    def run():
        try:
            barrier.wait()
            results.append(aggregate_usage(now=NOW))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert sorted(r.events for r in results) == [0, 0, 0, 6000]
    totals = UsageRecord.objects.aggregate(units=Sum("usage_units"), events=Sum("event_count"))
    assert totals["events"] == 6000
    assert totals["units"] == UsageEvent.objects.aggregate(s=Sum("usage_units"))["s"]
    assert_invariants()


def store(*raw) -> None:
    events, errors = validate_events(list(raw))
    assert not errors
    store_events(events)


def usage(event_id: str, hour: int, minute: int, units: str, account: str = "A") -> dict:
    return {"event_id": event_id, "client_acct_id": account, "usage_type_code": "API_CALLS",
            "usage_units": units, "usage_date": at(hour, minute).isoformat()}


@pytest.mark.django_db(transaction=True)
def test_an_event_added_while_its_window_closes_is_in_the_closed_record():
    configure(frequency_minutes=60)
    store(usage("first", 9, 0, "5"))
    added, release, runs = threading.Event(), threading.Event(), []

    def ingest_and_hold():
        # An ingest adds into the open record and has not committed when the run closes it.
        try:
            with transaction.atomic():
                store(usage("straggler", 9, 30, "2"))
                added.set()
                release.wait(10)
        finally:
            connections.close_all()

    def close():
        try:
            runs.append(aggregate_usage(now=NOW))
        finally:
            connections.close_all()

    ingesting = threading.Thread(target=ingest_and_hold)
    ingesting.start()
    assert added.wait(10)
    closing = threading.Thread(target=close)
    closing.start()
    closing.join(1)
    assert closing.is_alive()  # the close waits for the ingest's row lock
    release.set()
    ingesting.join(10)
    closing.join(10)

    record = UsageRecord.objects.get()
    assert (record.status, record.usage_units, record.event_count) == ("PENDING", 7, 2)
    assert set(record.events.values_list("event_id", flat=True)) == {"first", "straggler"}
    assert (runs[0].records, runs[0].events) == (1, 2)
    assert_invariants()


def test_an_event_arriving_after_its_window_closed_opens_a_record_for_a_later_batch():
    configure(frequency_minutes=60)
    store(usage("first", 9, 0, "5"))
    [closed] = aggregate_usage(now=NOW).batch_ids

    store(usage("late", 9, 30, "2"))
    late = UsageEvent.objects.get(event_id="late").record

    assert (late.status, late.batch) == ("OPEN", None)
    [later] = aggregate_usage(now=NOW).batch_ids
    assert AggregatedBatch.objects.get(pk=later).sequence == 2
    assert sorted(UsageRecord.objects.values_list("batch_id", "usage_units")) == [
        (closed, 5), (later, 2)
    ]
    assert_invariants()


def test_the_largest_usage_ingest_takes_sums_exactly_and_other_accounts_still_aggregate():
    # 200 events at ingest's limits overflowed the record's old columns, and the DataError
    # failed every run, for every account, every minute.
    whale = [
        {"event_id": f"whale-{n}", "client_acct_id": "WHALE", "usage_type_code": "API_CALLS",
         "usage_units": "99999999999999.999999", "amount": "9999999999999999.99",
         "usage_date": at(9, n % 60).isoformat()}
        for n in range(200)
    ]
    # A float would drift here (123456700000.01994 where floats add it up).
    ordinary = [
        {"event_id": f"acme-{n}", "client_acct_id": "ACME-001", "usage_type_code": "API_CALLS",
         "usage_units": "1234567.000001", "usage_date": at(9, n % 60).isoformat()}
        for n in range(100_000)
    ]
    events, errors = validate_events(whale + ordinary)
    assert not errors
    store_events(events)

    result = aggregate_usage(now=NOW)

    assert result.records == 2
    big = UsageRecord.objects.get(client_acct_id="WHALE")
    assert str(big.usage_units) == "19999999999999999.999800"
    assert str(big.amount) == "1999999999999999998.00"
    assert str(UsageRecord.objects.get(client_acct_id="ACME-001").usage_units) == (
        "123456700000.100000"
    )
    assert_invariants()
