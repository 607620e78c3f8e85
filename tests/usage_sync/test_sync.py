"""sync_batch against a fake core Aria at the HTTP transport (responses)."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import requests
import responses
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

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


def history(*client_record_ids):
    """A get_usage_history_m answer holding these records."""
    return ok(usage_history_recs=[{"client_record_id": cid} for cid in client_record_ids])


def only(rest_call):
    return [responses.matchers.json_params_matcher({"rest_call": rest_call}, strict_match=False)]


def settle(batch):
    """Let the batch's records in doubt settle: as if sent longer ago than the window."""
    UsageRecord.objects.filter(batch=batch, sent_at__isnull=False).update(
        sent_at=timezone.now() - timedelta(seconds=settings.SYNC_IN_DOUBT_SETTLE_SECONDS + 1)
    )


@responses.activate
@pytest.mark.parametrize(
    "error_records",
    [
        [{"out_client_record_id": "NOT-OURS", "record_error_code": 1001, "record_error_msg": "?"}],
        [{"out_client_record_id": None, "record_error_code": 1001, "record_error_msg": "?"}],
        [{"record_error_code": 1001, "record_error_msg": "?"}],
        ["1001: ?"],
        [{"out_client_record_id": "AU1-1", "record_error_msg": "no code"}],
    ],
    ids=["unknown-id", "null-id", "no-id", "not-an-object", "no-code"],
)
def test_an_answer_that_cannot_be_mapped_leaves_its_records_in_doubt_never_complete(
    client, batch, caplog, error_records
):
    responses.post(
        URL, json={"error_code": 1001, "error_msg": "unexpected", "error_records": error_records}
    )

    result = sync_batch(batch_id=batch.id, client=client)

    assert (result.outcome, result.completed, result.errors) == (Outcome.WAITING, 0, 0)
    assert set(UsageRecord.objects.values_list("status", "sync_error_code")) == {
        ("PENDING", "1001")
    }
    assert not UsageRecord.objects.filter(sent_at__isnull=True).exists()
    batch.refresh_from_db()
    sent_at = UsageRecord.objects.values_list("sent_at", flat=True).first()
    assert (batch.status, batch.pending_count) == (BatchStatus.PENDING, 3)
    assert batch.next_retry_at == sent_at + timedelta(seconds=settings.SYNC_IN_DOUBT_SETTLE_SECONDS)
    activity = SyncActivity.objects.get(action_name="BULK_RECORD_USAGE")
    assert (activity.status, activity.error_code) == ("ERROR", "1001")
    assert "could not be mapped" in activity.error_message
    assert activity.details["unmapped"] and activity.details["in_doubt"] == 3
    assert "could not be mapped" in caplog.text


@responses.activate
def test_after_an_unmappable_answer_what_aria_holds_completes_and_the_rest_is_its_error(
    client, batch
):
    held, *refused = batch.records.order_by("id")
    responses.post(URL, json={"error_code": 1009, "error_msg": "account does not exist",
                              "error_records": [{"out_client_record_id": None,
                                                 "record_error_code": 1009,
                                                 "record_error_msg": "Account not found"}]})
    sync_batch(batch_id=batch.id, client=client)
    settle(batch)
    responses.replace(responses.POST, URL, json=history(held.client_record_id),
                      match=only("get_usage_history_m"))

    result = sync_batch(batch_id=batch.id, client=client)

    assert (result.outcome, result.reconciled, result.sent) == (Outcome.SYNCED, 1, 0)
    assert UsageRecord.objects.get(pk=held.pk).status == RecordStatus.COMPLETE
    assert set(
        UsageRecord.objects.filter(pk__in=[r.pk for r in refused])
        .values_list("status", "sync_error_code", "sync_error_message", "sent_at")
    ) == {("ERROR", "1009", "account does not exist", None)}
    assert len(bulk_calls()) == 1  # nothing was sent again
    batch.refresh_from_db()
    assert (batch.status, batch.completed_count, batch.error_count) == (BatchStatus.ERROR, 1, 2)


@responses.activate
@pytest.mark.parametrize("code", [None, "0.0", True, 0.5, "", "OK"])
def test_an_answer_without_an_integer_error_code_is_a_transport_failure(client, batch, code):
    responses.post(URL, json={"error_code": code, "error_msg": "OK"})

    result = sync_batch(batch_id=batch.id, client=client)

    assert result.outcome == Outcome.RETRY
    assert "is not an integer" in result.detail
    assert UsageRecord.objects.filter(status="PENDING", sent_at__isnull=False).count() == 3


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
    assert batch.pending_count == 3
    assert UsageRecord.objects.filter(status="PENDING", sent_at__isnull=False).count() == 3
    # Not before the records in doubt have settled: core Aria may still be storing them.
    sent_at = UsageRecord.objects.values_list("sent_at", flat=True).first()
    assert batch.next_retry_at == sent_at + timedelta(seconds=settings.SYNC_IN_DOUBT_SETTLE_SECONDS)
    activity = SyncActivity.objects.get(action_name="BULK_RECORD_USAGE")
    assert (activity.status, activity.error_code) == ("ERROR", "TRANSPORT")


def test_a_call_that_never_left_leaves_nothing_in_doubt_and_retries_with_backoff(batch):
    # Nothing listens on port 1 of the loopback: the connection is refused.
    refused = AriaClient(url="http://127.0.0.1:1/v1/core", client_no=77, auth_key="k", timeout=2)

    result = sync_batch(batch_id=batch.id, client=refused)

    assert result.outcome == Outcome.RETRY
    assert not UsageRecord.objects.filter(sent_at__isnull=False).exists()
    batch.refresh_from_db()
    assert batch.next_retry_at < timezone.now() + timedelta(seconds=60)


@responses.activate
def test_records_in_doubt_are_neither_looked_up_nor_resent_before_they_settle(client, batch):
    responses.post(URL, body=requests.Timeout("read timed out"))
    sync_batch(batch_id=batch.id, client=client)
    AggregatedBatch.objects.filter(pk=batch.id).update(next_retry_at=None)  # delivered anyway

    result = sync_batch(batch_id=batch.id, client=client)

    assert result.outcome == Outcome.WAITING
    assert len(responses.calls) == 1
    batch.refresh_from_db()
    assert (batch.status, batch.claim_token) == (BatchStatus.PENDING, None)
    assert batch.next_retry_at > timezone.now() + timedelta(minutes=10)


@responses.activate
def test_records_in_doubt_that_aria_holds_become_complete_and_only_the_rest_are_resent(
    client, batch
):
    responses.post(URL, body=requests.Timeout("read timed out"))
    sync_batch(batch_id=batch.id, client=client)
    settle(batch)
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


def test_the_history_is_read_until_an_empty_page_not_a_short_one(client, batch):
    with responses.RequestsMock() as aria:
        aria.post(URL, body=requests.Timeout("read timed out"))
        sync_batch(batch_id=batch.id, client=client)
    settle(batch)
    held = list(batch.records.values_list("client_record_id", flat=True))
    # Core Aria pages by 2 rows here, fewer than we ask for: the third record is on page 2.
    pages = {0: ["OTHER-1", held[0]], 2: [held[1], held[2]], 4: []}
    asked = []

    def paged_history(request):
        body = json.loads(request.body)
        asked.append((body["rest_call"], body["offset"]))
        return 200, {}, json.dumps(history(*pages[body["offset"]]))

    with responses.RequestsMock() as aria:
        aria.add_callback(responses.POST, URL, callback=paged_history)
        result = sync_batch(batch_id=batch.id, client=client)

    assert (result.reconciled, result.sent) == (3, 0)
    # One account after the other, each to its empty page.
    assert asked == [("get_usage_history_m", offset) for offset in (0, 2, 4)] * 3


@responses.activate
def test_a_top_level_error_naming_no_record_leaves_the_call_in_doubt_unless_it_refused_it_all(
    client, batch
):
    responses.post(URL, json={"error_code": 1001, "error_msg": "unexpected error"})

    result = sync_batch(batch_id=batch.id, client=client)

    # Core Aria may have stored some records before it failed: not ERROR (a reprocess
    # would bill those twice), in doubt until the lookup says.
    assert result.outcome == Outcome.WAITING
    assert set(UsageRecord.objects.values_list("status", "sync_error_code")) == {
        ("PENDING", "1001")
    }


def test_records_marked_sent_too_long_ago_are_not_sent(batch):
    # A process paused between marking and sending: by the time it wakes, another worker
    # may have settled the records and sent them again. (A timeout this short stands for
    # a pause longer than any call.)
    paused = AriaClient(url=URL, client_no=77, auth_key="k", timeout=1e-9)

    with responses.RequestsMock() as aria:
        result = sync_batch(batch_id=batch.id, client=paused)
        assert len(aria.calls) == 0

    assert result.outcome == Outcome.RETRY and "not sent" in result.detail
    assert not UsageRecord.objects.filter(sent_at__isnull=False).exists()


@responses.activate
def test_a_sync_that_finishes_starts_the_backoff_afresh_next_time(client, batch):
    responses.post(URL, body=requests.ConnectionError("refused"))
    sync_batch(batch_id=batch.id, client=client)
    settle(batch)
    responses.replace(responses.POST, URL, json=history(), match=only("get_usage_history_m"))
    responses.post(URL, json=ok(), match=only("bulk_record_usage_m"))
    AggregatedBatch.objects.filter(pk=batch.id).update(next_retry_at=None)

    assert sync_batch(batch_id=batch.id, client=client).outcome == Outcome.SYNCED
    batch.refresh_from_db()
    assert (batch.status, batch.sync_attempts) == (BatchStatus.COMPLETE, 0)


@responses.activate
def test_the_activity_entry_of_a_call_names_the_records_it_carried(client, batch):
    responses.post(URL, json=ok())

    sync_batch(batch_id=batch.id, client=client)

    entry = SyncActivity.objects.get(action_name="BULK_RECORD_USAGE")
    assert sorted(entry.details["client_record_ids"]) == sorted(
        batch.records.values_list("client_record_id", flat=True)
    )
    assert entry.details["client_receipt_id"] == bulk_calls()[0]["client_receipt_id"]
