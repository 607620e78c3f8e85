"""The claim on a batch as a fencing token, and recounts under the batch's row lock."""

import json
import threading
from datetime import timedelta

import psycopg
import pytest
import responses
from django.conf import settings
from django.db import connection, connections
from django.utils import timezone

from tests.factories import make_batch
from usage_sync.billing import AriaClient
from usage_sync.claims import Claim, ClaimLost
from usage_sync.models import AggregatedBatch, BatchStatus, RecordStatus, SyncActivity, UsageRecord
from usage_sync.sync import Outcome, sync_batch

pytestmark = pytest.mark.django_db

URL_A = "http://aria-a.test/v1/core"
URL_B = "http://aria-b.test/v1/core"


def go_stale(batch_id: int) -> None:
    AggregatedBatch.objects.filter(pk=batch_id).update(
        sync_started_at=timezone.now() - timedelta(seconds=settings.SYNC_CLAIM_STALE_SECONDS + 1)
    )


def test_a_claim_taken_over_can_write_nothing_more():
    batch = make_batch(pending=2)
    first = Claim.take(batch.id)
    assert Claim.take(batch.id) is None  # held
    go_stale(batch.id)
    second = Claim.take(batch.id)

    with pytest.raises(ClaimLost), first.fenced():
        UsageRecord.objects.filter(batch=batch).update(status=RecordStatus.COMPLETE)
    with pytest.raises(ClaimLost):
        first.renew()
    with second.fenced():
        pass
    assert set(UsageRecord.objects.values_list("status", flat=True)) == {RecordStatus.PENDING}


@responses.activate
def test_a_worker_whose_claim_was_taken_over_mid_call_writes_nothing_and_nothing_is_billed_twice():
    batch = make_batch(pending=3)
    stored: list[str] = []  # what the one core Aria behind both URLs holds

    def bulk(request):
        body = json.loads(request.body)
        if body["rest_call"] == "get_usage_history_m":
            return 200, {}, json.dumps({"error_code": 0, "error_msg": "OK", "usage_history_recs": [
                {"client_record_id": cid} for cid in stored]})
        stored.extend(r["client_record_id"] for r in body["usage_recs"])
        return 200, {}, json.dumps({"error_code": 0, "error_msg": "OK"})

    def slow_bulk_of_worker_a(request):
        # While A waits for its answer, its claim goes stale (A froze) and B takes over.
        go_stale(batch.id)
        taken_over.append(sync_batch(batch_id=batch.id, client=worker_b))
        return bulk(request)

    taken_over = []
    responses.add_callback(responses.POST, URL_A, callback=slow_bulk_of_worker_a)
    responses.add_callback(responses.POST, URL_B, callback=bulk)
    worker_a = AriaClient(url=URL_A, client_no=1, auth_key="k", timeout=2)
    worker_b = AriaClient(url=URL_B, client_no=1, auth_key="k", timeout=2)

    result = sync_batch(batch_id=batch.id, client=worker_a)

    # B found A's records in doubt, too fresh to look up: it left them alone.
    assert taken_over[0].outcome == Outcome.WAITING
    # A got its answer but had lost its claim: it wrote nothing.
    assert (result.outcome, result.detail) == (Outcome.SKIPPED, "claim lost")
    assert not SyncActivity.objects.filter(action_name="BULK_RECORD_USAGE").exists()
    in_doubt = UsageRecord.objects.filter(status=RecordStatus.PENDING, sent_at__isnull=False)
    assert in_doubt.count() == 3
    # Once they settled, the lookup finds them: COMPLETE, each billed once.
    UsageRecord.objects.update(sent_at=timezone.now() - timedelta(days=1))
    AggregatedBatch.objects.filter(pk=batch.id).update(next_retry_at=None)
    assert sync_batch(batch_id=batch.id, client=worker_b).reconciled == 3
    assert sorted(stored) == sorted(batch.records.values_list("client_record_id", flat=True))
    batch.refresh_from_db()
    assert (batch.status, batch.completed_count, batch.claim_token) == (
        BatchStatus.COMPLETE, 3, None
    )


@pytest.mark.django_db(transaction=True)
def test_a_recount_waits_for_a_writer_holding_the_batch_and_counts_what_it_wrote():
    batch = make_batch(complete=2)
    db = connection.settings_dict
    writer = psycopg.connect(host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"],
                             dbname=db["NAME"])
    try:
        # A writer (a reprocess, a sync) holds the batch row and sets a record back to PENDING.
        writer.execute("SELECT id FROM usage_sync_aggregatedbatch WHERE id = %s FOR UPDATE",
                       [batch.id])
        record_id = batch.records.order_by("id").values_list("id", flat=True).first()
        writer.execute("UPDATE usage_sync_usagerecord SET status = 'PENDING' WHERE id = %s",
                       [record_id])
        done = threading.Event()

        def recount():
            try:
                AggregatedBatch.objects.filter(pk=batch.id).recount(release=True)
            finally:
                connections.close_all()
                done.set()

        thread = threading.Thread(target=recount)
        thread.start()
        assert not done.wait(1), "the recount did not wait for the batch's row lock"
        writer.commit()
        thread.join(10)
    finally:
        writer.close()

    batch.refresh_from_db()
    assert (batch.pending_count, batch.completed_count, batch.status) == (
        1, 1, BatchStatus.PENDING
    )


def test_a_claimed_batch_left_without_pending_records_is_not_kept_in_process():
    # The sync settled the last records in doubt, then died before releasing the batch:
    # kept IN_PROCESS with nothing PENDING, nothing would ever claim, sweep or reprocess it.
    batch = make_batch(pending=1)
    claim = Claim.take(batch.id)
    UsageRecord.objects.filter(batch=batch).update(status=RecordStatus.COMPLETE)
    with claim.fenced():
        AggregatedBatch.objects.filter(pk=batch.id).recount()

    batch.refresh_from_db()
    assert (batch.status, batch.pending_count) == (BatchStatus.COMPLETE, 0)
