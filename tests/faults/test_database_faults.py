"""PostgreSQL drops a worker's connection (pg_terminate_backend) in the middle of work."""

import pytest

from tests.faults.conftest import wait_for_call
from tests.services import wait_for
from usage_sync.models import (
    AggregatedBatch,
    RecordStatus,
    SyncActivity,
    UsageEvent,
    UsageRecord,
)
from usage_sync.publishing import publish_batches

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def test_a_connection_dropped_mid_aggregation_rolls_back_and_the_next_run_aggregates_all(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002", "UNKNOWN-1"])
    stack.configure(batch_size=4)
    stack.start_worker("w")
    stack.wait_until_ready()
    # The worker's run stages the open records, inserts batches, then waits for this row
    # to close it: the connection dies mid-transaction.
    with stack.row_lock(UsageRecord._meta.db_table, UsageRecord.objects.order_by("id").last().id):
        stack.tick_aggregation()
        [pid] = wait_for(lambda: stack.worker_backends(blocked_on="usage_sync_usagerecord"),
                         timeout=60, what="the aggregation to wait at the close step")
        stack.terminate(pid)
    wait_for(lambda: "aggregate_usage_if_due" in stack.logs() and "raised" in stack.logs(),
             timeout=30, what="the aggregation task to fail")
    assert not AggregatedBatch.objects.exists()
    # Rolled back whole: every record still OPEN, every event still in its record.
    assert set(UsageRecord.objects.values_list("status", "batch")) == {("OPEN", None)}
    assert not UsageEvent.objects.filter(record__isnull=True).exists()

    # Beat's next tick (a minute later) runs it again, as the run is still due. The same
    # worker processes must have dropped their dead connection by then.
    stack.tick_aggregation()

    stack.assert_reconciled(unknown_accounts=["UNKNOWN-1"])


def test_a_connection_dropped_while_storing_an_outcome_leaves_records_in_doubt_not_lost(stack):
    stack.ingest(accounts=["ACME-001", "ACME-002", "ACME-003", "ACME-004"], hours=1)
    [batch_id] = stack.aggregate(batch_size=100)
    # Aria stores the records at once and answers 1.5 s later (the timeout is 2 s).
    stack.simulator.configure(late_answer_seconds=1.5)
    # A claim goes stale only after 5 minutes here: the worker must give the batch back
    # itself (it used to stay claimed, its redelivered id skipped).
    stack.env["SYNC_CLAIM_STALE_SECONDS"] = "300"
    stack.start_worker("w")
    publish_batches([batch_id])
    wait_for_call(stack, "bulk_record_usage_m")
    # The answer arrives while we hold the batch row: the worker updates the records, then
    # waits for the batch row inside the same transaction, and its connection dies there.
    with stack.row_lock(AggregatedBatch._meta.db_table, batch_id):
        [pid] = wait_for(lambda: stack.worker_backends(blocked_on="usage_sync_aggregatedbatch"),
                         timeout=30, what="the outcome's transaction to wait for the batch")
        stack.terminate(pid)
    stack.simulator.configure(late_answer_seconds=0)
    # Nothing of the outcome was committed: the records are in doubt, core Aria holds them.
    in_doubt = UsageRecord.objects.filter(status=RecordStatus.PENDING, sent_at__isnull=False)
    assert in_doubt.count() == UsageRecord.objects.count() == 4
    assert len(stack.simulator.records()) == 4

    stack.assert_reconciled()
    assert SyncActivity.objects.filter(batch_id=batch_id, error_code="UNEXPECTED").exists()
    # They were found in core Aria, not sent again.
    bulk = [c for c in stack.simulator.calls() if c["rest_call"] == "bulk_record_usage_m"]
    assert len(bulk) == 1
