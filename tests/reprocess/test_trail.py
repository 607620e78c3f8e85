"""The usage trail: search, and the record, event and batch pages (console and API)."""

from datetime import UTC, datetime, timedelta

import pytest
import responses
from django.urls import reverse

from reprocess import trail
from reprocess.reprocess import reprocess_run_create
from usage_sync.aggregation import aggregate_usage
from usage_sync.billing import AriaClient
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import UsageEvent, UsageRecord
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
    waiting = console.get(reverse("console:event"), {"id": "late-1"}).content.decode()
    # Hourly windows, 5 minutes of grace: 10:00-11:00 closes at 11:05.
    assert "waiting for its window to close at 2026-12-01 11:05 UTC" in waiting
    assert console.get(reverse("console:event"), {"id": "nobody"}).status_code == 404


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
    assert [h["kind"] for h in record["history"]] == ["call"]
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
