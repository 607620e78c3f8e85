"""reconcile() and manage.py reconcile_usage against the database and the simulator process.

Each test breaks one invariant the way a bug or a fault would, and checks that the report
names it; a healthy pipeline reconciles.
"""

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db.models import F
from django.utils import timezone

from tests.factories import UsageEventFactory
from tests.services import AUTH_KEY, CLIENT_NO, Simulator
from usage_sync import reconcile as reconcile_module
from usage_sync.aggregation import aggregate_usage
from usage_sync.billing import AriaClient, usage_rec
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import (
    AggregatedBatch,
    AggregationConfig,
    BatchStatus,
    RecordStatus,
    UsageEvent,
    UsageRecord,
)
from usage_sync.reconcile import reconcile, reconcile_steps
from usage_sync.sync import sync_batch

NOW = datetime(2026, 11, 21, tzinfo=UTC)

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def aria(tmp_path_factory):
    simulator = Simulator(
        "--client-no", str(CLIENT_NO), "--auth-key", AUTH_KEY,
        log=tmp_path_factory.mktemp("reconcile") / "simulator.log",
    ).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def client(aria, settings):
    aria.reset()
    settings.ARIA_API_URL = aria.url
    settings.ARIA_CLIENT_NO = CLIENT_NO
    settings.ARIA_AUTH_KEY = AUTH_KEY
    return AriaClient(url=aria.url, client_no=CLIENT_NO, auth_key=AUTH_KEY, timeout=5)


@pytest.fixture
def synced(client):
    """Two days of usage of three accounts (one unknown to Aria), aggregated and synced."""
    raw = [
        {
            "event_id": f"{account}-{day}-{hour}-{n}",
            "client_acct_id": account,
            "usage_type_code": "API_CALLS",
            "usage_units": "1.5",
            "amount": "0.30",
            "usage_date": f"2026-11-{day}T{hour:02d}:{n:02d}:00Z",
        }
        for account in ("ACME-001", "ACME-002", "UNKNOWN-1")
        for day in (18, 19)
        for hour in range(3)
        for n in range(2)
    ]
    events, errors = validate_events(raw)
    assert not errors
    store_events(events)
    config = AggregationConfig.load()
    config.batch_size = 4
    config.save()
    for batch_id in aggregate_usage(now=NOW).batch_ids:
        sync_batch(batch_id=batch_id, client=client)
    assert not UsageRecord.objects.filter(status=RecordStatus.PENDING).exists()
    return client


def complete_record() -> UsageRecord:
    return UsageRecord.objects.filter(status=RecordStatus.COMPLETE).order_by("id").first()


def test_a_healthy_pipeline_reconciles_and_counts_what_it_checked(synced):
    steps = []

    report = reconcile(client=synced, advance=steps.append)

    assert report.ok, report.problems
    assert report.checked["events"] == 36
    assert report.checked["events_linked"] == 36
    assert report.checked["records"] == 18
    assert report.checked["records_complete"] == 12
    assert report.checked["records_error"] == 6
    assert report.checked["aria_records"] == 12
    assert report.checked["batches"] == AggregatedBatch.objects.count()
    assert sum(steps) == reconcile_steps(check_aria=True)


def test_a_corrupted_batch_counter_is_named(synced):
    batch = AggregatedBatch.objects.filter(completed_count__gt=0).first()
    AggregatedBatch.objects.filter(pk=batch.pk).update(
        completed_count=F("completed_count") - 1, pending_count=F("pending_count") + 1
    )

    report = reconcile(client=synced)

    assert not report.ok
    [line] = report.problems
    assert line.startswith(f"batch {batch.pk}: pending 1 (records say 0)")
    assert "completed" in line


def test_a_batch_status_that_does_not_follow_from_its_records_is_named(synced):
    batch = AggregatedBatch.objects.filter(status=BatchStatus.ERROR).first()
    AggregatedBatch.objects.filter(pk=batch.pk).update(status=BatchStatus.COMPLETE)

    report = reconcile(client=synced)

    assert report.problems == [
        f"batch {batch.pk}: status COMPLETE (records say ERROR)"
    ]


def test_a_batch_left_in_process_with_nothing_pending_is_named(synced):
    batch = AggregatedBatch.objects.filter(status=BatchStatus.ERROR).first()
    AggregatedBatch.objects.filter(pk=batch.pk).update(status=BatchStatus.IN_PROCESS)

    report = reconcile(client=synced, check_aria=False)

    assert report.problems == [f"batch {batch.pk}: status IN_PROCESS (records say ERROR)"]


def test_an_event_moved_to_another_record_breaks_both_sums(synced):
    first, second = UsageRecord.objects.filter(client_acct_id="ACME-001").order_by("id")[:2]
    event = first.events.first()
    UsageEvent.objects.filter(pk=event.pk).update(record=second)

    report = reconcile(client=synced, check_aria=False)

    named = " ".join(report.problems)
    assert f"record {first.client_record_id}: 2 events" in named
    assert f"record {second.client_record_id}: 2 events" in named
    assert f"event {event.event_id} is linked to record {second.client_record_id}" in named


def test_an_event_counted_twice_is_named(synced):
    record = complete_record()
    event = record.events.first()
    event.pk, event.event_id = None, event.event_id + "-copy"
    event.save()  # a second row for the same usage, linked to the same record

    report = reconcile(client=synced, check_aria=False)

    [line] = report.problems
    assert line.startswith(f"record {record.client_record_id}: 2 events, 3.000000")
    assert "; its linked events: 3, 4.5" in line


def test_an_event_of_another_account_linked_to_a_record_is_named(synced):
    record = complete_record()
    event = record.events.first()
    other = UsageEvent.objects.exclude(client_acct_id=record.client_acct_id).first()
    UsageEvent.objects.filter(pk=event.pk).update(record=other.record)
    UsageEvent.objects.filter(pk=other.pk).update(record=record)

    report = reconcile(client=synced, check_aria=False)

    assert any(f"event {other.event_id} is linked to record {record.client_record_id}" in p
               for p in report.problems)


def test_a_record_the_last_run_should_have_closed_is_named_but_a_late_one_is_not(synced):
    config = AggregationConfig.load()
    run = timezone.now()
    config.last_run_at = run
    config.save()
    events, _ = validate_events([
        {"event_id": "forgotten", "client_acct_id": "ACME-001", "usage_type_code": "API_CALLS",
         "usage_units": "1", "usage_date": "2026-11-20T05:00:00Z"},
        {"event_id": "late", "client_acct_id": "ACME-002", "usage_type_code": "API_CALLS",
         "usage_units": "1", "usage_date": "2026-11-20T05:00:00Z"},
    ])
    store_events(events)
    forgotten = UsageEvent.objects.get(event_id="forgotten").record
    UsageRecord.objects.filter(pk=forgotten.pk).update(created_at=run - timedelta(hours=1))
    UsageRecord.objects.filter(events__event_id="late").update(
        created_at=run + timedelta(seconds=1)
    )

    report = reconcile(client=synced, check_aria=False)

    [line] = report.problems
    assert line.startswith(f"record id {forgotten.pk} (window 2026-11-20 05:00:00")
    assert "is still OPEN, though its window had ended before the last" in line
    assert (report.checked["records_open"], report.checked["events_unlinked"]) == (2, 0)


def test_an_event_in_no_record_is_named_once_a_run_could_have_adopted_it(synced):
    UsageEventFactory(event_id="orphan")
    config = AggregationConfig.load()
    config.last_run_at = timezone.now() - timedelta(minutes=1)
    config.save()
    # Received after the last run: the next one adopts it.
    assert reconcile(client=synced, check_aria=False).ok
    config.last_run_at = timezone.now()
    config.save()

    report = reconcile(client=synced, check_aria=False)

    assert report.problems == [
        f"event orphan ({UsageEvent.objects.get(event_id='orphan').usage_date}) is in no record"
    ]


def test_a_complete_record_core_aria_does_not_hold_is_named(synced, aria):
    record = complete_record()
    assert aria.forget([record.client_record_id]) == 1

    report = reconcile(client=synced)

    assert report.problems == [
        f"record {record.client_record_id} is COMPLETE here but core Aria does not hold it"
    ]


def test_a_record_billed_twice_is_named(synced):
    record = complete_record()
    synced.bulk_record_usage(usage_recs=[usage_rec(record)], client_receipt_id="twice")

    report = reconcile(client=synced)

    assert report.problems == [
        f"record {record.client_record_id} (COMPLETE) is held by core Aria 2 times: billed "
        "more than once"
    ]


def test_error_and_never_sent_records_held_by_core_aria_are_named_in_doubt_ones_not(synced):
    errored, never_sent, in_doubt = UsageRecord.objects.filter(
        status=RecordStatus.COMPLETE
    ).order_by("id")[:3]
    UsageRecord.objects.filter(pk=errored.pk).update(
        status=RecordStatus.ERROR, sync_error_code="1001", sync_error_message="unexpected"
    )
    UsageRecord.objects.filter(pk=never_sent.pk).update(status=RecordStatus.PENDING)
    UsageRecord.objects.filter(pk=in_doubt.pk).update(
        status=RecordStatus.PENDING, sent_at=timezone.now()
    )
    for batch_id in {errored.batch_id, never_sent.batch_id, in_doubt.batch_id}:
        AggregatedBatch.objects.filter(pk=batch_id).recount()

    report = reconcile(client=synced)

    assert sorted(report.problems) == sorted([
        f"record {errored.client_record_id} is ERROR 1001 here but core Aria holds it",
        f"record {never_sent.client_record_id} is PENDING, never sent here but core Aria "
        "holds it",
    ])
    assert report.checked["records_in_doubt"] == 1


def test_a_client_record_id_core_aria_holds_but_no_record_has_is_named(synced):
    stray = usage_rec(complete_record())
    stray["client_record_id"] = "AU999999-1"
    synced.bulk_record_usage(usage_recs=[stray], client_receipt_id="stray")

    report = reconcile(client=synced)

    assert report.problems == [
        "core Aria holds client_record_id AU999999-1, which no record here has"
    ]


def test_since_leaves_out_older_usage(synced, aria):
    old = UsageRecord.objects.filter(
        status=RecordStatus.COMPLETE, usage_date__lt=datetime(2026, 11, 19, tzinfo=UTC)
    ).first()
    aria.forget([old.client_record_id])

    assert not reconcile(client=synced).ok
    assert reconcile(client=synced, since=datetime(2026, 11, 19, tzinfo=UTC)).ok


def test_core_aria_unreachable_is_a_problem_and_no_aria_skips_it(synced):
    dead = AriaClient(url="http://127.0.0.1:9/v1/core", client_no=CLIENT_NO,
                      auth_key=AUTH_KEY, timeout=1)

    report = reconcile(client=dead)

    # One line per account; its COMPLETE records are not reported missing.
    assert len(report.problems) == 3
    assert all(p.startswith("core Aria could not be checked for account ")
               for p in report.problems)
    assert reconcile(client=dead, check_aria=False).ok


def test_problems_beyond_the_limit_are_counted(synced, monkeypatch):
    monkeypatch.setattr(reconcile_module, "PROBLEM_LIMIT", 2)
    UsageRecord.objects.update(usage_units=F("usage_units") + Decimal("1"))

    report = reconcile(client=synced, check_aria=False)

    assert len(report.problems) == 3
    assert report.problems[-1] == "… and 16 more of the kind above"


def test_the_command_prints_a_summary_and_exits_0_when_everything_holds(synced):
    out = io.StringIO()

    call_command("reconcile_usage", stdout=out)

    text = out.getvalue()
    assert "Checked: events 36, events_linked 36" in text
    assert "Everything reconciles (database and core Aria)." in text
    assert "DISAGREES" not in text


def test_the_command_prints_every_disagreement_and_exits_1(synced, aria):
    record = complete_record()
    aria.forget([record.client_record_id])
    batch = AggregatedBatch.objects.filter(error_count__gt=0).first()
    AggregatedBatch.objects.filter(pk=batch.pk).update(status=BatchStatus.COMPLETE)
    out = io.StringIO()

    with pytest.raises(CommandError, match="2 disagreements"):
        call_command("reconcile_usage", "--since", "2026-11-01", stdout=out)

    lines = [line for line in out.getvalue().splitlines() if line.startswith("DISAGREES")]
    assert lines == [
        f"DISAGREES: batch {batch.pk}: status COMPLETE (records say ERROR)",
        f"DISAGREES: record {record.client_record_id} is COMPLETE here but core Aria does "
        "not hold it",
    ]


def test_the_command_checks_the_database_only_with_no_aria(synced, settings):
    settings.ARIA_API_URL = "http://127.0.0.1:9/v1/core"
    out = io.StringIO()

    call_command("reconcile_usage", "--no-aria", stdout=out)

    assert "Everything reconciles (database only)." in out.getvalue()


def test_the_command_refuses_a_bad_date(synced):
    with pytest.raises(CommandError, match="not a YYYY-MM-DD date"):
        call_command("reconcile_usage", "--since", "yesterday")
