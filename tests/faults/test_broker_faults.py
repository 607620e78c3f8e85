"""The Kafka-protocol broker (tansu, in memory) restarted while batches are streaming."""

import pytest

from tests.services import wait_for
from usage_sync.models import AggregatedBatch, BatchStatus
from usage_sync.publishing import publish_batches

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def test_a_broker_restarted_mid_stream_loses_its_messages_and_the_sweep_recovers(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002", "UNKNOWN-1"], hours=12)
    batch_ids = stack.aggregate(batch_size=3)
    assert len(batch_ids) == 12
    # Each call takes 1.5 s (under the 2 s timeout): the stream still flows when the
    # broker goes.
    stack.simulator.configure(latency_seconds=1.5)
    stack.start_worker("w")
    publish_batches(batch_ids)
    wait_for(lambda: AggregatedBatch.objects.exclude(status=BatchStatus.PENDING).exists(),
             timeout=60, what="the first batch to be synced")

    left = AggregatedBatch.objects.filter(pending_count__gt=0).count()
    stack.broker.stop()  # topic, messages, committed offsets and the group: all gone
    stack.broker.start()
    stack.simulator.configure(latency_seconds=0)

    assert left, "the broker went down after the stream had finished"
    stack.assert_reconciled(unknown_accounts=["UNKNOWN-1"])
