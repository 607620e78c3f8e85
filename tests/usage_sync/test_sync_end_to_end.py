"""The whole sync path with real parts: PostgreSQL, Redis, the tansu broker, Celery
workers in their own processes and the core Aria simulator process.

Every scenario ends with the same proof: each aggregated record is in core Aria exactly
once and COMPLETE here, or ERROR here with Aria's code and message; nothing PENDING;
batch counters equal the record counts.
"""

import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis
from django.db.models import Count

from tests.services import SyncStack, redis_db_url, wait_for
from usage_sync.aggregation import aggregate_usage
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import (
    AggregatedBatch,
    AggregationConfig,
    RecordStatus,
    SyncActivity,
    UsageRecord,
)
from usage_sync.publishing import publish_batches

NOW = datetime(2026, 11, 21, tzinfo=UTC)
REDIS_DB_URL = redis_db_url(13)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


class Pipeline(SyncStack):
    def ingest(self, *, accounts: list[str], windows: int = 4, events_per_group: int = 3):
        raw = [
            {
                "event_id": f"{account}-{window}-{n}",
                "client_acct_id": account,
                "usage_type_code": "API_CALLS",
                "usage_units": "1.5",
                "usage_date": f"2026-11-20T{window:02d}:{n:02d}:00Z",
            }
            for account in accounts
            for window in range(windows)
            for n in range(events_per_group)
        ]
        events, errors = validate_events(raw)
        assert not errors
        store_events(events)

    def aggregate(self, *, batch_size: int = 5) -> list[int]:
        config = AggregationConfig.load()
        config.batch_size = batch_size
        config.save()
        return aggregate_usage(now=NOW).batch_ids

    def assert_billed_exactly_once(self):
        records = {r.client_record_id: r for r in UsageRecord.objects.all()}
        stored = Counter(r["client_record_id"] for r in self.simulator.records())
        duplicates = {cid: n for cid, n in stored.items() if n > 1}
        assert duplicates == {}, f"billed more than once: {duplicates}"
        complete = {cid for cid, r in records.items() if r.status == RecordStatus.COMPLETE}
        assert set(stored) == complete
        for record in records.values():
            assert record.status in (RecordStatus.COMPLETE, RecordStatus.ERROR)
            if record.status == RecordStatus.ERROR:
                assert record.sync_error_code and record.sync_error_message
        units = {r["client_record_id"]: Decimal(str(r["units"])) for r in self.simulator.records()}
        assert all(units[cid] == records[cid].usage_units for cid in complete)
        for batch in AggregatedBatch.objects.all():
            counts = dict(batch.records.values_list("status").annotate(n=Count("id")))
            assert batch.total_count == sum(counts.values())
            assert batch.completed_count == counts.get("COMPLETE", 0)
            assert batch.error_count == counts.get("ERROR", 0)
            assert batch.pending_count == 0


@pytest.fixture
def pipeline(tmp_path, settings, broker, simulator):
    redis.Redis.from_url(REDIS_DB_URL).flushdb()
    pipeline = Pipeline(tmp_path, settings, broker, simulator, redis_url=REDIS_DB_URL)
    yield pipeline
    pipeline.close()


def test_known_accounts_complete_and_unknown_accounts_error_with_arias_code(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002", "UNKNOWN-1"])
    publish_batches(pipeline.aggregate())
    pipeline.start_worker("w")

    pipeline.wait_until_settled()

    pipeline.assert_billed_exactly_once()
    errors = UsageRecord.objects.filter(status=RecordStatus.ERROR)
    assert errors.count() == 4
    assert set(errors.values_list("client_acct_id", "sync_error_code")) == {("UNKNOWN-1", "1009")}


def test_a_worker_stops_cleanly_on_sigterm_with_its_consumers_running(pipeline):
    worker = pipeline.start_worker("w")
    log = pipeline.tmp_path / "worker-w.log"
    wait_for(lambda: log.read_text().count(" subscribed to ") == 2, timeout=30,
             what="the consumers to subscribe")
    started = time.monotonic()

    worker.stop()

    # Warm shutdown: each consumer finished, left its group and exited on its own.
    assert worker.process.popen.returncode == 0
    assert time.monotonic() - started < 15
    assert log.read_text().count("stopped after") == 2


def test_the_same_batch_id_delivered_twice_bills_once(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002", "ACME-003"])
    batch_ids = pipeline.aggregate()
    publish_batches(batch_ids)
    publish_batches(batch_ids)
    publish_batches(batch_ids[:2])
    pipeline.start_worker("w")

    pipeline.wait_until_settled()
    # Every delivery handled, the duplicates too (each logs its outcome: synced or skipped).
    log = pipeline.tmp_path / "worker-w.log"
    deliveries = 2 * len(batch_ids) + 2
    wait_for(lambda: log.read_text().count("INFO usage_sync.consumer batch ") >= deliveries,
             timeout=30, what="every delivery to be handled")

    pipeline.assert_billed_exactly_once()


def test_two_workers_share_the_partitions_and_bill_once(pipeline):
    pipeline.ingest(accounts=[f"ACME-{n:03d}" for n in range(1, 9)], windows=8)
    batch_ids = pipeline.aggregate(batch_size=3)
    assert len(batch_ids) >= 20
    pipeline.start_worker("a")
    pipeline.start_worker("b")
    publish_batches(batch_ids)
    publish_batches(batch_ids)

    pipeline.wait_until_settled(timeout=120)

    pipeline.assert_billed_exactly_once()
    receipts = [
        c for c in pipeline.simulator.calls() if c.get("rest_call") == "bulk_record_usage_m"
    ]
    assert len(receipts) >= len(batch_ids)


def test_a_worker_killed_mid_call_then_restarted_bills_once(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002"])
    batch_ids = pipeline.aggregate()
    # Aria stores the records, then takes 3 s to answer: the kill lands in between.
    pipeline.simulator.configure(late_answer_seconds=3)
    worker = pipeline.start_worker("w")
    publish_batches(batch_ids)
    wait_for(lambda: pipeline.simulator.records(), timeout=60, what="a call to reach Aria")
    worker.kill()
    assert UsageRecord.objects.filter(status="PENDING", sent_at__isnull=False).exists()
    pipeline.simulator.configure(late_answer_seconds=0)

    pipeline.start_worker("w")  # restarted by its supervisor
    pipeline.wait_until_settled(timeout=120)

    pipeline.assert_billed_exactly_once()


def test_aria_storing_then_answering_after_the_timeout_bills_once(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002"])
    batch_ids = pipeline.aggregate()
    pipeline.simulator.configure(late_answer_seconds=4)  # the client gives up after 2 s
    pipeline.start_worker("w")
    publish_batches(batch_ids)
    wait_for(
        lambda: SyncActivity.objects.filter(error_code="TRANSPORT").exists(),
        timeout=60,
        what="a call to time out",
    )
    pipeline.simulator.configure(late_answer_seconds=0)

    pipeline.wait_until_settled(timeout=120)

    pipeline.assert_billed_exactly_once()
    assert UsageRecord.objects.filter(attempts__gte=1, status="COMPLETE").exists()


def test_bursts_of_http_500_are_retried_until_billed_once(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002", "ACME-003"])
    batch_ids = pipeline.aggregate()
    pipeline.simulator.configure(fail_next_n=6)
    pipeline.start_worker("w")
    publish_batches(batch_ids)

    pipeline.wait_until_settled(timeout=120)

    pipeline.assert_billed_exactly_once()
    assert SyncActivity.objects.filter(error_code="TRANSPORT").count() >= 1


def test_batches_published_while_the_broker_is_down_go_out_when_it_is_back(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002"])
    pipeline.start_worker("w")
    pipeline.broker.stop()
    batch_ids = pipeline.aggregate()
    assert publish_batches(batch_ids, timeout=2) == []
    assert not AggregatedBatch.objects.filter(published_at__isnull=False).exists()

    pipeline.broker.start()  # an empty in-memory broker: only the sweep can save us
    pipeline.wait_until_settled(timeout=120)

    pipeline.assert_billed_exactly_once()


def test_a_wrong_auth_key_errors_every_record_with_1004_and_loses_none(pipeline):
    pipeline.ingest(accounts=["ACME-001", "ACME-002"])
    batch_ids = pipeline.aggregate()
    pipeline.env["ARIA_AUTH_KEY"] = "not-the-key"
    pipeline.start_worker("w")
    publish_batches(batch_ids)

    pipeline.wait_until_settled()

    pipeline.assert_billed_exactly_once()
    assert set(UsageRecord.objects.values_list("status", "sync_error_code")) == {("ERROR", "1004")}
    assert UsageRecord.objects.count() == 8
