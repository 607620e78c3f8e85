"""Claims under contention: workers racing for a batch, a claim taken over while its
worker is frozen mid-call, and a consumer overrunning Kafka's poll interval mid-call."""

from collections import Counter

import pytest

from tests.faults.conftest import wait_for_call
from tests.services import wait_for
from usage_sync.models import AggregatedBatch, RecordStatus, UsageRecord
from usage_sync.publishing import publish_batches

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def sends_per_record(stack) -> Counter:
    return Counter(
        cid for c in stack.simulator.calls() if c["rest_call"] == "bulk_record_usage_m"
        for cid in c["client_record_ids"]
    )


def test_two_workers_racing_for_the_same_batches_while_core_aria_is_slow_send_each_once(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002", "ACME-003"], hours=3)
    batch_ids = stack.aggregate(batch_size=3)
    stack.simulator.configure(latency_seconds=1.5)
    stack.start_worker("a")
    stack.start_worker("b")
    # Every batch id several times over: the workers' consumers receive them side by side.
    for _ in range(3):
        publish_batches(batch_ids)

    stack.assert_reconciled()
    assert set(sends_per_record(stack).values()) == {1}


def test_a_claim_taken_over_while_its_worker_is_frozen_mid_call_bills_once(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002"], hours=1)
    [batch_id] = stack.aggregate(batch_size=10)
    stack.simulator.configure(latency_seconds=1.5)
    # Dynamic members: the frozen worker's partitions move to the other one once its session
    # times out (tansu never expires a static member that stopped heartbeating).
    dynamic = {"KAFKA_STATIC_MEMBERSHIP": "false"}
    frozen = stack.start_worker("frozen", env=dynamic)
    publish_batches([batch_id])
    wait_for_call(stack, "bulk_record_usage_m")
    # Frozen mid-call (a VM paused, a stop-the-world pause): its claim goes stale.
    frozen.suspend()
    claim = AggregatedBatch.objects.get(pk=batch_id).claim_token

    stack.start_worker("taker", env=dynamic)
    # The sweep hands the batch to the other worker, which settles the records in doubt
    # with core Aria (the frozen call stored them) and takes over the claim.
    wait_for(lambda: not UsageRecord.objects.exclude(status=RecordStatus.COMPLETE).exists(),
             timeout=90, what="the other worker to take the batch over")
    assert AggregatedBatch.objects.get(pk=batch_id).claim_token != claim
    frozen.resume()  # its answer arrives now: it must write nothing

    wait_for(lambda: "the claim was taken over" in stack.logs(), timeout=30,
             what="the thawed worker to find its claim gone")
    stack.assert_reconciled()
    assert set(sends_per_record(stack).values()) == {1}


def test_a_consumer_overrunning_its_poll_interval_mid_call_bills_once(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002", "ACME-003"], hours=2)
    batch_ids = stack.aggregate(batch_size=3)
    # Each call takes 8 s, longer than the consumer may go without polling (6 s): the group
    # moves its partition on mid-call, and another consumer receives the batch id again.
    stack.simulator.configure(latency_seconds=8)
    slow_calls = {
        "ARIA_TIMEOUT_SECONDS": "10", "SYNC_CLAIM_STALE_SECONDS": "12",
        "SYNC_IN_DOUBT_SETTLE_SECONDS": "11", "KAFKA_MAX_POLL_INTERVAL_MS": "6000",
    }
    stack.start_worker("a", env=slow_calls)
    stack.start_worker("b", env=slow_calls)
    publish_batches(batch_ids)
    wait_for(lambda: "maximum poll interval" in stack.logs().lower()
             or "not committed" in stack.logs(), timeout=90,
             what="a consumer to overrun its poll interval")
    stack.simulator.configure(latency_seconds=0)

    stack.assert_reconciled(timeout=150)
    assert set(sends_per_record(stack).values()) == {1}
