"""The pipeline keeps moving around its own consumers: workers started with a small pool,
and a retry republished while a worker restarts."""

import time

import pytest

from tests.faults.conftest import wait_for_call
from tests.services import wait_for
from usage_sync.models import AggregatedBatch, RecordStatus, SyncActivity, UsageRecord
from usage_sync.publishing import publish_batches

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]

# What the issue asks: settled within a minute of core Aria answering again.
RECOVERY_SECONDS = 60


def recovered_within(stack, seconds: float) -> float:
    started = time.monotonic()
    stack.wait_until_settled(timeout=seconds)
    return time.monotonic() - started


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_worker_with_a_small_pool_still_retries_and_settles(stack, concurrency):
    stack.ingest(accounts=["ACME-001", "ACME-002"], hours=3)
    batch_ids = stack.aggregate(batch_size=2)
    # Core Aria is down (HTTP 500 before storing anything): every batch needs the sweep to
    # publish its retry, and the sweep needs a pool slot.
    stack.simulator.configure(error_rate=1.0)
    stack.start_worker("small", concurrency=concurrency)
    publish_batches(batch_ids)
    wait_for(lambda: SyncActivity.objects.filter(error_code="TRANSPORT").count() >= 6,
             timeout=60, what="retries of every batch")
    assert "sync consumers (topic" in stack.logs()

    stack.simulator.configure(error_rate=0)

    assert recovered_within(stack, RECOVERY_SECONDS) < RECOVERY_SECONDS
    stack.assert_reconciled()


def test_a_retry_republished_while_the_worker_restarts_settles(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002"], hours=2)
    batch_ids = stack.aggregate(batch_size=2)
    stack.simulator.configure(fail_next_n=len(batch_ids))
    first = stack.start_worker("w")
    publish_batches(batch_ids)
    wait_for_call(stack, "bulk_record_usage_m", after=len(batch_ids) - 1)
    wait_for(lambda: AggregatedBatch.objects.filter(next_retry_at__isnull=False).count()
             == len(batch_ids), timeout=30, what="every batch to wait for its retry")

    # The retries come due and the sweep republishes them while the worker goes down and
    # comes up again: its consumers rejoin the group after the ids are on the topic.
    first.stop()
    stack.start_worker("w")

    assert recovered_within(stack, RECOVERY_SECONDS) < RECOVERY_SECONDS
    stack.assert_reconciled()
    assert not UsageRecord.objects.exclude(status=RecordStatus.COMPLETE).exists()
