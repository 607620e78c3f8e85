"""Worker processes SIGKILLed mid-work, two beats at once, Redis restarted with tasks queued."""

from collections import Counter

import pytest
import redis

from tests.faults.conftest import wait_for_call
from tests.services import wait_for
from usage_sync.models import (
    AggregatedBatch,
    RecordStatus,
    SyncActivity,
    UsageRecord,
)
from usage_sync.publishing import publish_batches

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def test_a_worker_killed_mid_aggregation_leaves_nothing_half_done(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002"])
    stack.configure(batch_size=3)
    doomed = stack.start_worker("doomed")
    stack.wait_until_ready()
    with stack.row_lock(UsageRecord._meta.db_table, UsageRecord.objects.order_by("id").last().id):
        stack.tick_aggregation()
        [pid] = wait_for(lambda: stack.worker_backends(blocked_on="usage_sync_usagerecord"),
                         timeout=60, what="the aggregation to wait at the close step")
        doomed.kill()
    # Its backend notices the dead client once the lock is free, and rolls back.
    wait_for(lambda: pid not in stack.worker_backends(), timeout=30,
             what="the dead worker's backend to end")
    assert set(UsageRecord.objects.values_list("status", "batch")) == {("OPEN", None)}
    assert not AggregatedBatch.objects.exists()

    stack.start_worker("doomed")  # restarted by its supervisor
    stack.wait_until_ready(2)
    stack.tick_aggregation()  # the killed task's message waits for Redis' visibility timeout

    stack.assert_reconciled()


def test_workers_killed_mid_call_and_mid_reconciliation_bill_once(stack):
    # Extends test_sync_end_to_end's kill mid-call: the next worker dies too, while it asks
    # core Aria which records in doubt it holds; only the third one finishes.
    stack.ingest(accounts=["ACME-001", "ACME-002", "UNKNOWN-1"], hours=2)
    batch_ids = stack.aggregate(batch_size=10)
    stack.simulator.configure(late_answer_seconds=3)
    first = stack.start_worker("w")
    publish_batches(batch_ids)
    wait_for(lambda: len(stack.simulator.records()) == 4, timeout=60,
             what="both calls to reach Aria")
    first.kill()
    assert UsageRecord.objects.filter(status="PENDING", sent_at__isnull=False).count() == 6

    # The history lookup takes 1.5 s (under the 2 s timeout): the kill lands during it.
    stack.simulator.configure(late_answer_seconds=0, latency_seconds=1.5)
    second = stack.start_worker("w")  # restarted
    wait_for_call(stack, "get_usage_history_m")
    second.kill()
    assert UsageRecord.objects.filter(status="PENDING", sent_at__isnull=False).exists()
    stack.simulator.configure(latency_seconds=0)

    stack.start_worker("w")  # and again
    stack.assert_reconciled(unknown_accounts=["UNKNOWN-1"])
    # What core Aria held was found, not sent again; only the 1009 records (never held)
    # went out once more.
    sent = Counter(
        cid for c in stack.simulator.calls() if c["rest_call"] == "bulk_record_usage_m"
        for cid in c["client_record_ids"]
    )
    complete = UsageRecord.objects.filter(status=RecordStatus.COMPLETE)
    assert {sent[cid] for cid in complete.values_list("client_record_id", flat=True)} == {1}


def test_two_beats_schedule_everything_twice_and_nothing_is_done_twice(stack):
    stack.env["LOG_LEVEL"] = "DEBUG"  # Celery's lines of each task received and done
    stack.ingest(accounts=["ACME-001", "ACME-002", "ACME-003"])
    stack.configure(batch_size=2)
    stack.start_worker("a", beat=False)
    stack.start_worker("b", beat=False)
    stack.start_beat("beat")
    stack.start_beat("beat")
    stack.wait_until_ready(2)
    # Both beats send every tick (sweep, consumer restarts; aggregation once a minute, sent
    # here at once): two aggregation runs race for the same events.
    stack.tick_aggregation()
    stack.tick_aggregation()

    stack.assert_reconciled()
    assert stack.logs().count("beat: Starting...") == 2
    runs = stack.logs().count("Task usage_sync.tasks.aggregate_usage_if_due[")
    assert runs >= 4  # received and succeeded, twice (once on each worker, at once)
    # One run aggregated everything, the other found nothing left to do.
    assert SyncActivity.objects.filter(action_name="AGGREGATE").count() == 1


def test_redis_restarted_with_tasks_queued_loses_them_and_nothing_else(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002"], hours=3)
    batch_ids = stack.aggregate(batch_size=2)
    worker = stack.start_worker("w", beat=False)
    stack.start_beat("beat")
    stack.wait_until_ready()
    wait_for(lambda: "sync consumers (topic" in stack.logs(), timeout=30,
             what="the consumers to start")
    # Freeze the worker: beat keeps queueing the sweep and aggregation.
    worker.suspend()
    publish_batches(batch_ids)
    queue = redis.Redis.from_url(stack.redis.url)
    wait_for(lambda: queue.llen("celery") >= 4, timeout=30, what="tasks to queue up")

    stack.redis.restart()  # empty: the queued tasks are gone
    assert queue.llen("celery") == 0
    worker.resume()

    stack.assert_reconciled()
    assert worker.process.running
    assert not UsageRecord.objects.filter(status=RecordStatus.PENDING).exists()
