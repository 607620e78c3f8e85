"""sync_batch against a fake core Aria at the HTTP transport (responses)."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import requests
import responses
from django.test import override_settings

from usage_sync.aggregation import aggregate_usage
from usage_sync.billing import AriaClient
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import AggregatedBatch, BatchStatus, RecordStatus, SyncActivity, UsageRecord
from usage_sync.sync import Outcome, sync_batch

URL = "http://aria.test/v1/core"
NOW = datetime(2026, 11, 21, tzinfo=UTC)

pytestmark = pytest.mark.django_db


@pytest.fixture
def client():
    return AriaClient(url=URL, client_no=77, auth_key="s3cret-key", timeout=2)


@pytest.fixture
def batch():
    raw = [
        {
            "event_id": f"e{n}",
            "client_acct_id": f"ACME-{n % 3}",
            "usage_type_code": "API_CALLS",
            "usage_units": "1.25",
            "usage_date": "2026-11-20T09:10:00Z",
        }
        for n in range(9)
    ]
    events, errors = validate_events(raw)
    assert not errors
    store_events(events)
    [batch_id] = aggregate_usage(now=NOW).batch_ids
    return AggregatedBatch.objects.get(pk=batch_id)


def bulk_calls():
    return [
        json.loads(c.request.body)
        for c in responses.calls
        if json.loads(c.request.body)["rest_call"] == "bulk_record_usage_m"
    ]


def ok(**extra):
    return {"error_code": 0, "error_msg": "OK", **extra}


@responses.activate
def test_it_sends_every_pending_record_and_marks_them_complete(client, batch):
    responses.post(URL, json=ok())

    result = sync_batch(batch_id=batch.id, client=client)

    assert (result.outcome, result.sent, result.completed) == (Outcome.SYNCED, 3, 3)
    [payload] = bulk_calls()
    assert payload["rest_call"] == "bulk_record_usage_m"
    assert payload["output_format"] == "json"
    assert payload["client_no"] == 77
    assert payload["auth_key"] == "s3cret-key"
    assert payload["client_receipt_id"].startswith(f"AUB{batch.id}-")
    assert sorted(r["client_record_id"] for r in payload["usage_recs"]) == sorted(
        batch.records.values_list("client_record_id", flat=True)
    )
    first = next(r for r in payload["usage_recs"] if r["client_acct_id"] == "ACME-0")
    assert first == {
        "client_record_id": first["client_record_id"],
        "client_acct_id": "ACME-0",
        "usage_type_code": "API_CALLS",
        "usage_units": 3.75,
        "usage_date": "2026-11-20 09:00:00",
    }
    batch.refresh_from_db()
    assert (batch.status, batch.completed_count, batch.pending_count) == (
        BatchStatus.COMPLETE,
        3,
        0,
    )
    assert not UsageRecord.objects.exclude(status=RecordStatus.COMPLETE).exists()


@responses.activate
def test_error_records_map_back_by_client_record_id_and_the_rest_complete(client, batch):
    failing = batch.records.get(client_acct_id="ACME-1")
    responses.post(
        URL,
        json={
            "error_code": 1009,
            "error_msg": "account does not exist",
            "error_records": [
                {
                    "out_client_record_id": failing.client_record_id,
                    "acct_no": None,
                    "record_error_code": 1009,
                    "record_error_msg": "Account not found: ClientId ACME-1",
                }
            ],
        },
    )

    result = sync_batch(batch_id=batch.id, client=client)

    assert (result.completed, result.errors) == (2, 1)
    failing.refresh_from_db()
    assert (failing.status, failing.sync_error_code, failing.sync_error_message) == (
        RecordStatus.ERROR,
        "1009",
        "Account not found: ClientId ACME-1",
    )
    batch.refresh_from_db()
    assert (batch.status, batch.error_count, batch.completed_count) == (BatchStatus.ERROR, 1, 2)
    assert SyncActivity.objects.get(action_name="BULK_RECORD_USAGE").status == "PARTIAL"


@responses.activate
def test_a_top_level_error_without_error_records_fails_every_record(client, batch):
    responses.post(URL, json={"error_code": 1004, "error_msg": "authentication error"})

    sync_batch(batch_id=batch.id, client=client)

    assert set(UsageRecord.objects.values_list("status", "sync_error_code")) == {("ERROR", "1004")}
    activity = SyncActivity.objects.get(action_name="BULK_RECORD_USAGE")
    assert (activity.status, activity.error_code) == ("ERROR", "1004")


@responses.activate
def test_error_records_naming_unknown_ids_are_logged_and_mark_nothing_wrongly(
    client, batch, caplog
):
    responses.post(
        URL,
        json={
            "error_code": 1001,
            "error_msg": "unexpected error",
            "error_records": [
                {
                    "out_client_record_id": "NOT-OURS",
                    "record_error_code": 1001,
                    "record_error_msg": "?",
                }
            ],
        },
    )

    result = sync_batch(batch_id=batch.id, client=client)

    assert result.completed == 3
    assert "NOT-OURS" in caplog.text
    assert SyncActivity.objects.get(action_name="BULK_RECORD_USAGE").details[
        "unknown_error_records"
    ] == ["NOT-OURS"]


@responses.activate
def test_a_complete_record_is_never_sent_again(client, batch):
    responses.post(URL, json=ok())
    sync_batch(batch_id=batch.id, client=client)

    again = sync_batch(batch_id=batch.id, client=client)

    assert again.outcome == Outcome.SKIPPED
    assert len(bulk_calls()) == 1


@responses.activate
def test_error_records_are_not_retried_automatically(client, batch):
    responses.post(URL, json={"error_code": 1004, "error_msg": "authentication error"})
    sync_batch(batch_id=batch.id, client=client)

    assert sync_batch(batch_id=batch.id, client=client).outcome == Outcome.SKIPPED
    assert len(bulk_calls()) == 1


@responses.activate
def test_a_second_delivery_while_the_batch_is_in_process_does_nothing(client, batch):
    AggregatedBatch.objects.filter(pk=batch.id).update(
        status=BatchStatus.IN_PROCESS, sync_started_at=datetime.now(UTC)
    )

    assert sync_batch(batch_id=batch.id, client=client).outcome == Outcome.SKIPPED
    assert len(responses.calls) == 0


@responses.activate
@override_settings(SYNC_CLAIM_STALE_SECONDS=30)
def test_an_abandoned_claim_is_taken_over_after_it_goes_stale(client, batch):
    responses.post(URL, json=ok())
    AggregatedBatch.objects.filter(pk=batch.id).update(
        status=BatchStatus.IN_PROCESS, sync_started_at=datetime.now(UTC) - timedelta(seconds=31)
    )

    assert sync_batch(batch_id=batch.id, client=client).outcome == Outcome.SYNCED


@responses.activate
@pytest.mark.parametrize(
    "failure",
    [
        {"body": requests.ConnectionError("refused")},
        {"body": requests.Timeout("read timed out")},
        {"status": 500, "json": {"error": "boom"}},
        {"status": 200, "body": "<html>not json</html>"},
    ],
    ids=["connection", "timeout", "http-500", "malformed"],
)
def test_a_transport_failure_leaves_records_in_doubt_and_the_batch_due_for_retry(
    client, batch, failure
):
    responses.post(URL, **failure)

    result = sync_batch(batch_id=batch.id, client=client)

    assert result.outcome == Outcome.RETRY
    batch.refresh_from_db()
    assert batch.status == BatchStatus.PENDING
    assert batch.sync_attempts == 1
    assert batch.next_retry_at is not None
    assert batch.pending_count == 3
    assert UsageRecord.objects.filter(status="PENDING", sent_at__isnull=False).count() == 3
    activity = SyncActivity.objects.get(action_name="BULK_RECORD_USAGE")
    assert (activity.status, activity.error_code) == ("ERROR", "TRANSPORT")


@responses.activate
def test_records_in_doubt_that_aria_holds_become_complete_and_only_the_rest_are_resent(
    client, batch
):
    responses.post(URL, body=requests.Timeout("read timed out"))
    sync_batch(batch_id=batch.id, client=client)
    stored_one = batch.records.order_by("id").first()
    responses.replace(
        responses.POST,
        URL,
        json=ok(usage_history_recs=[{"client_record_id": stored_one.client_record_id}]),
        match=[
            responses.matchers.json_params_matcher(
                {"rest_call": "get_usage_history_m"}, strict_match=False
            )
        ],
    )
    responses.post(
        URL,
        json=ok(),
        match=[
            responses.matchers.json_params_matcher(
                {"rest_call": "bulk_record_usage_m"}, strict_match=False
            )
        ],
    )

    result = sync_batch(batch_id=batch.id, client=client)

    assert (result.reconciled, result.sent) == (1, 2)
    resent = bulk_calls()[-1]
    assert stored_one.client_record_id not in {r["client_record_id"] for r in resent["usage_recs"]}
    assert UsageRecord.objects.filter(status=RecordStatus.COMPLETE).count() == 3
    history_call = next(
        json.loads(c.request.body)
        for c in responses.calls
        if json.loads(c.request.body)["rest_call"] == "get_usage_history_m"
    )
    assert history_call["date_range_start"] == "2026-11-20 09:00:00"


@responses.activate
def test_the_auth_key_never_reaches_the_activity_log_or_the_logs(client, batch, caplog):
    responses.post(URL, json={"error_code": 1004, "error_msg": "authentication error"})

    sync_batch(batch_id=batch.id, client=client)
    responses.replace(responses.POST, URL, body=requests.ConnectionError("refused"))
    UsageRecord.objects.update(status="PENDING")
    AggregatedBatch.objects.update(pending_count=3, error_count=0)
    sync_batch(batch_id=batch.id, client=client)

    assert "s3cret-key" not in caplog.text
    assert "s3cret-key" not in repr(client)
    for entry in SyncActivity.objects.all():
        assert "s3cret-key" not in json.dumps(entry.details) + entry.error_message
