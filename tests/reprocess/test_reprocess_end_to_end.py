"""Reprocess with real parts: PostgreSQL, Redis, the tansu broker, a Celery worker and the
core Aria simulator. Records fail in core Aria, the operator fixes the cause in the
simulator, then reprocesses through the API at each level in turn: exactly the selected
records are sent again, once; COMPLETE records never are; done batches leave the
incomplete list."""

from collections import Counter
from datetime import UTC, datetime

import pytest
import redis

from reprocess import tasks
from tests.factories import grant_reprocess
from tests.services import SyncStack, redis_db_url, wait_for
from usage_sync.aggregation import aggregate_usage
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import AggregatedBatch, AggregationConfig, UsageRecord
from usage_sync.publishing import publish_batches

NOW = datetime(2026, 11, 21, tzinfo=UTC)
REDIS_DB_URL = redis_db_url(12)
# Per window: one record Aria knows, one of an account it learns later (1009), and one of a
# usage type it learns later (the simulator's 1017).
GROUPS = [("ACME-001", "API_CALLS"), ("NEWCO-001", "API_CALLS"), ("ACME-002", "NEWCO_UNITS")]

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


class Pipeline(SyncStack):
    def ingest_and_aggregate(self, *, windows: int) -> list[int]:
        raw = [
            {
                "event_id": f"{account}-{window}-{n}",
                "client_acct_id": account,
                "usage_type_code": usage_type,
                "usage_units": "2",
                "usage_date": f"2026-11-20T{window:02d}:{n:02d}:00Z",
            }
            for account, usage_type in GROUPS
            for window in range(windows)
            for n in range(2)
        ]
        events, errors = validate_events(raw)
        assert not errors
        store_events(events)
        config = AggregationConfig.load()
        config.batch_size = 10
        config.save()
        return aggregate_usage(now=NOW).batch_ids

    def sends(self) -> Counter:
        """How many bulk_record_usage_m calls carried each client_record_id."""
        return Counter(
            cid
            for call in self.simulator.calls()
            if call.get("rest_call") == "bulk_record_usage_m"
            for cid in call["client_record_ids"]
        )


@pytest.fixture
def pipeline(tmp_path, settings, broker, simulator):
    redis.Redis.from_url(REDIS_DB_URL).flushdb()
    pipeline = Pipeline(
        tmp_path, settings, broker, simulator, redis_url=REDIS_DB_URL, partitions=3
    )
    yield pipeline
    pipeline.close()


def incomplete_batches(client) -> list[int]:
    response = client.get("/api/v1/batches/?incomplete=true&ordering=id")
    assert response.status_code == 200
    return [row["id"] for row in response.json()["results"]]


def record_ids(batch_id: int, **filters) -> set[str]:
    return set(
        UsageRecord.objects.filter(batch_id=batch_id, **filters).values_list(
            "client_record_id", flat=True
        )
    )


def test_reprocessing_at_each_level_resends_exactly_the_selected_records_once(
    pipeline, api_client, user, settings, monkeypatch
):
    grant_reprocess(user)
    b1, b2, b3 = pipeline.ingest_and_aggregate(windows=3)
    pipeline.start_worker(env={"REPROCESS_RESUME_AFTER_SECONDS": "1",
                               "REPROCESS_CHUNK_RECORDS": "1"})
    publish_batches([b1, b2, b3])
    pipeline.wait_until_settled()

    assert set(UsageRecord.objects.values_list("client_acct_id", "status", "sync_error_code")) == {
        ("ACME-001", "COMPLETE", ""), ("NEWCO-001", "ERROR", "1009"), ("ACME-002", "ERROR", "1017")
    }
    assert incomplete_batches(api_client) == [b1, b2, b3]
    complete = set(UsageRecord.objects.filter(status="COMPLETE").values_list(
        "client_record_id", flat=True))
    expected = Counter({cid: 1 for cid in UsageRecord.objects.values_list(
        "client_record_id", flat=True)})
    assert pipeline.sends() == expected

    # The operator adds the account in core Aria, then reprocesses one summary line.
    pipeline.simulator.configure(accounts=["NEWCO-001"])
    response = api_client.post(
        f"/api/v1/batches/{b1}/error-summary/reprocess/",
        {"error_code": "1009", "status": "ERROR", "reason": "NEWCO-001 created"},
        format="json",
    )
    assert response.status_code == 202
    assert (response.json()["records"], response.json()["batches"]) == (1, 1)
    pipeline.wait_until_settled()
    expected.update(record_ids(b1, client_acct_id="NEWCO-001"))
    assert pipeline.sends() == expected
    assert record_ids(b1, status="ERROR") == record_ids(b1, client_acct_id="ACME-002")
    run = api_client.get(f"/api/v1/reprocess/{response.json()['run_id']}/").json()
    assert run["progress"] == {"completed": 1, "errored": 0, "pending": 0, "ignored": 0}
    assert run["finished"] is True
    assert incomplete_batches(api_client) == [b1, b2, b3]

    # The usage type is created too; the operator reprocesses a whole batch.
    pipeline.simulator.configure(usage_types=["NEWCO_UNITS"])
    response = api_client.post(f"/api/v1/batches/{b2}/reprocess/", {}, format="json")
    assert response.status_code == 202
    assert (response.json()["records"], response.json()["batches"]) == (2, 1)
    pipeline.wait_until_settled()
    expected.update(record_ids(b2, status="COMPLETE") - complete)
    assert pipeline.sends() == expected
    assert incomplete_batches(api_client) == [b1, b3]

    # And then everything that is left, as a run too large to queue within its request
    # whose task the broker loses: the worker's beat resumes it, chunk by chunk.
    settings.REPROCESS_INLINE_RECORDS = 1
    monkeypatch.setattr(tasks.queue_reprocess_run, "delay", lambda run_id: None)
    response = api_client.post("/api/v1/reprocess/all/", {}, format="json")
    assert response.status_code == 202
    assert response.json()["queued"] is False
    assert (response.json()["records"], response.json()["batches"]) == (3, 2)
    progress = f"/api/v1/reprocess/{response.json()['run_id']}/"
    wait_for(lambda: api_client.get(progress).json()["queued"], timeout=30,
             what="the beat to resume the run")
    pipeline.wait_until_settled()
    run = api_client.get(progress).json()
    assert (run["records_selected"], run["batches_selected"], run["finished"]) == (3, 2, True)
    expected.update(record_ids(b1, client_acct_id="ACME-002"))
    expected.update(record_ids(b3) - complete)
    assert pipeline.sends() == expected
    assert incomplete_batches(api_client) == []

    # Each record is in core Aria exactly once; the complete ones were sent only once.
    stored = Counter(r["client_record_id"] for r in pipeline.simulator.records())
    assert stored == Counter({cid: 1 for cid in UsageRecord.objects.values_list(
        "client_record_id", flat=True)})
    assert all(pipeline.sends()[cid] == 1 for cid in complete)
    assert not UsageRecord.objects.exclude(status="COMPLETE").exists()
    for batch in AggregatedBatch.objects.all():
        assert (batch.status, batch.completed_count, batch.total_count) == ("COMPLETE", 3, 3)
