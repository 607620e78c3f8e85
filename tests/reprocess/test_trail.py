"""The usage trail: search, and the record, event and batch pages (console and API)."""

from datetime import UTC, datetime, timedelta

import pytest
import requests
import responses
from django.urls import reverse
from django.utils import timezone

from reprocess import trail
from reprocess.reprocess import reprocess_run_create
from usage_sync.aggregation import aggregate_usage
from usage_sync.billing import AriaClient
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import SyncActivity, UsageEvent, UsageRecord
from usage_sync.sync import sync_batch

pytestmark = pytest.mark.django_db

URL = "http://aria.test/v1/core"
DAY = datetime(2026, 11, 20, tzinfo=UTC)


@pytest.fixture
def synced(published):
    """Two accounts' usage aggregated into one batch and synced: ACME's record COMPLETE,
    WHALE's ERROR 1009 (core Aria does not know the account)."""
    raw = [
        {"event_id": f"{account}-{n}", "client_acct_id": account, "usage_type_code": "GB",
         "usage_units": "1.5", "amount": "2.25", "usage_date": (DAY + timedelta(minutes=n))
         .isoformat()}
        for account in ("ACME-1", "WHALE-9") for n in range(3)
    ]
    events, errors = validate_events(raw)
    assert not errors
    store_events(events)
    [batch_id] = aggregate_usage(now=DAY + timedelta(days=1)).batch_ids
    failing = UsageRecord.objects.get(client_acct_id="WHALE-9")
    with responses.RequestsMock() as aria:
        aria.post(URL, json={"error_code": 1009, "error_msg": "account does not exist",
                             "error_records": [{"out_client_record_id": failing.client_record_id,
                                                "record_error_code": 1009,
                                                "record_error_msg": "Account not found"}]})
        sync_batch(batch_id=batch_id, client=AriaClient(url=URL, client_no=1, auth_key="k"))
    return failing


@pytest.fixture
def console(client, operator):
    client.force_login(operator)
    return client


def kinds(query):
    return [m.kind for m in trail.find(query)]


def test_it_recognises_each_kind_of_name(synced):
    call = synced.batch.activity.get(action_name="BULK_RECORD_USAGE")
    assert kinds(synced.client_record_id) == ["record"]
    assert kinds("WHALE-9-1") == ["event"]
    assert kinds(call.details["client_receipt_id"]) == ["receipt"]
    assert kinds(str(synced.batch_id)) == ["batch"]
    assert kinds("WHALE-9") == ["account"]
    assert kinds("nobody") == [] and kinds("") == [] and kinds("x" * 500) == []


def test_only_plain_ascii_numbers_name_a_batch_or_an_account_number(synced):
    batch = str(synced.batch_id)
    arabic_indic = "".join(chr(0x0660 + int(d)) for d in batch)
    full_width = "".join(chr(0xFF10 + int(d)) for d in batch)
    UsageRecord.objects.filter(pk=synced.pk).update(acct_no=9_223_372_036_854_775_807)

    assert kinds(arabic_indic) == [] and kinds(full_width) == [] and kinds("0" + batch) == []
    assert kinds("9223372036854775807") == ["account"]  # 19 digits: the largest bigint
    assert kinds("9223372036854775808") == []


def test_the_search_lands_on_the_one_match_or_lists_them(console, synced):
    response = console.get(reverse("console:search"), {"q": "WHALE-9-2"})
    assert response.status_code == 302
    assert response.url == reverse("console:event") + "?id=WHALE-9-2"
    UsageEvent.objects.filter(event_id="ACME-1-0").update(event_id=str(synced.batch_id))
    both = console.get(reverse("console:search"), {"q": str(synced.batch_id)})
    assert both.status_code == 200
    assert [m.kind for m in both.context["matches"]] == ["event", "batch"]
    assert console.get(reverse("console:search"), {"q": "nobody"}).status_code == 404


def test_the_record_page_shows_its_history_and_its_events_adding_up(console, synced):
    reprocess_run_create(level="BATCH", batch_id=synced.batch_id, actor="ops",
                         reason="account created in core Aria")

    page = console.get(reverse("console:record", args=[synced.pk]))

    history = page.context["history"]
    assert [(e.kind, e.outcome, e.record_outcome) for e in history] == [
        ("call", "PARTIAL", "ERROR 1009"), ("reprocess", "queued from ERROR", "ERROR 1009")]
    assert "account created in core Aria" in history[1].detail
    assert [e.event_id for e in page.context["events"]] == ["WHALE-9-0", "WHALE-9-1", "WHALE-9-2"]
    assert page.context["sums_agree"]
    html = page.content.decode()
    assert "They add up to the record." in html
    assert "2026-11-20 00:00 UTC" in html  # times say their zone


def test_the_record_page_marks_events_that_do_not_add_up(console, synced):
    UsageRecord.objects.filter(pk=synced.pk).update(usage_units=synced.usage_units + 1)

    page = console.get(reverse("console:record", args=[synced.pk]))

    assert not page.context["sums_agree"]
    assert "do not add up to the record" in page.content.decode()


def test_the_event_page_says_where_the_event_went_or_when_its_window_closes(console, synced):
    went = console.get(reverse("console:event"), {"id": "WHALE-9-1"}).content.decode()
    assert synced.client_record_id in went and "ERROR" in went and "1009" in went

    events, _ = validate_events([{
        "event_id": "late-1", "client_acct_id": "ACME-1", "usage_type_code": "GB",
        "usage_units": "1", "usage_date": "2026-12-01T10:20:00Z",
    }])
    store_events(events)
    overdue = console.get(reverse("console:event"), {"id": "late-1"}).content.decode()
    # Hourly windows, 5 minutes of grace: 10:00-11:00 closed at 11:05.
    late = UsageEvent.objects.get(event_id="late-1").record
    assert f"open record {late.pk}" in overdue and "OPEN" in overdue
    assert "its window closed at 2026-12-01 11:05 UTC" in overdue
    assert "the next aggregation run puts it into a batch" in overdue

    events, _ = validate_events([{
        "event_id": "now-1", "client_acct_id": "ACME-1", "usage_type_code": "GB",
        "usage_units": "1", "usage_date": timezone.now().isoformat(),
    }])
    store_events(events)
    waiting = console.get(reverse("console:event"), {"id": "now-1"}).content.decode()
    closes_at = trail.window_closes_at(UsageEvent.objects.get(event_id="now-1"))
    assert f"into a batch when its window closes at {closes_at:%Y-%m-%d %H:%M} UTC" in waiting
    assert console.get(reverse("console:event"), {"id": "nobody"}).status_code == 404


def test_a_call_is_credited_only_with_what_the_entry_right_after_it_shows(synced):
    first = synced.batch.activity.get(action_name="BULK_RECORD_USAGE")
    # An earlier call of the same record that left it in doubt, then the call above.
    SyncActivity.objects.create(
        action_name="BULK_RECORD_USAGE", object_name="Batch", batch_id=synced.batch_id,
        status="ERROR", error_code="TRANSPORT", created_at=first.created_at - timedelta(1),
        details={"client_receipt_id": "R0", "sent": 2,
                 "client_record_ids": [synced.client_record_id, "other"]},
    )
    reprocess_run_create(level="BATCH", batch_id=synced.batch_id, actor="ops")

    history = trail.record_history(synced)

    assert [(e.receipt_id, e.record_outcome) for e in history if e.kind == "call"] == [
        ("R0", ""), (first.details["client_receipt_id"], "ERROR 1009")]


def test_calls_whose_entry_does_not_list_the_record_are_shown_as_such(synced):
    synced.batch.activity.update(details={"client_receipt_id": "R1", "sent": 3000,
                                          "client_record_ids": ["AU-someone-else"] * 2000})
    SyncActivity.objects.create(
        action_name="BULK_RECORD_USAGE", object_name="Batch", batch_id=synced.batch_id,
        status="ERROR", error_code="TRANSPORT", details={"client_receipt_id": "R2"},
    )
    SyncActivity.objects.create(
        action_name="BULK_RECORD_USAGE", object_name="Batch", batch_id=synced.batch_id,
        status="ERROR", details={"client_receipt_id": "R3", "sent": 1,
                                 "client_record_ids": ["AU-someone-else"]},
    )

    history = trail.record_history(synced)

    assert [(e.receipt_id, e.listed, e.record_outcome) for e in history] == [
        ("R1", False, ""), ("R2", False, "")]
    assert all("does not list the records" in e.detail for e in history)


def test_a_call_that_failed_in_transit_names_the_records_it_carried(published):
    raw = [{"event_id": f"t-{n}", "client_acct_id": "ACME-1", "usage_type_code": "GB",
            "usage_units": "1", "usage_date": DAY.isoformat()} for n in range(2)]
    events, _ = validate_events(raw)
    store_events(events)
    [batch_id] = aggregate_usage(now=DAY + timedelta(days=1)).batch_ids
    record = UsageRecord.objects.get(batch_id=batch_id)
    with responses.RequestsMock() as aria:
        aria.post(URL, body=requests.ReadTimeout("no answer"))
        sync_batch(batch_id=batch_id, client=AriaClient(url=URL, client_no=1, auth_key="k"))

    [call] = trail.record_history(record)

    assert (call.error_code, call.listed) == ("TRANSPORT", True)
    assert call.receipt_id.startswith(f"AUB{batch_id}-")


def test_the_batch_page_shows_its_calls_and_reprocesses_and_links_its_records(console, synced):
    reprocess_run_create(level="ALL", actor="ops")

    page = console.get(reverse("console:batch", args=[synced.batch_id]))

    assert [a.action_name for a in page.context["timeline"]] == [
        "BULK_RECORD_USAGE", "REPROCESS"]
    assert reverse("console:record", args=[synced.pk]) in page.content.decode()


def test_the_api_traces_and_gives_a_record_trail_and_an_event(api_client, synced):
    traced = api_client.get("/api/v1/trace/", {"q": synced.client_record_id}).json()
    assert traced["matches"] == [{"kind": "record", "label": f"Record {synced.client_record_id}",
                                  "url": reverse("console:record", args=[synced.pk])}]

    record = api_client.get(f"/api/v1/records/{synced.pk}/trail/").json()
    assert record["record"]["status"] == "ERROR"
    [call] = record["history"]
    assert (call["kind"], call["outcome"], call["record_outcome"], call["error_code"],
            call["listed"]) == ("call", "PARTIAL", "ERROR 1009", "1009", True)
    assert call["receipt_id"].startswith(f"AUB{synced.batch_id}-") and call["activity_id"]
    assert record["events"] == {"count": 3, "usage_units": "4.500000", "amount": "6.75",
                                "agree": True}

    event = api_client.get("/api/v1/events/", {"event_id": "WHALE-9-0"}).json()
    assert (event["record"], event["record_status"], event["batch"]) == (
        synced.pk, "ERROR", synced.batch_id)
    assert event["received_at"].endswith("Z") or "+00:00" in event["received_at"]
    assert api_client.get("/api/v1/events/", {"event_id": "nobody"}).status_code == 404
    assert api_client.get("/api/v1/records/999999999/trail/").status_code == 404


def test_a_records_history_takes_two_queries(synced, django_assert_num_queries):
    with django_assert_num_queries(2):  # its batch's calls, its reprocess links
        trail.record_history(synced)
