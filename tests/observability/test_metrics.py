"""/metrics: every metric after a real ingest, aggregation, sync and reprocess, moving by
exactly what happened; consumer lag against a real broker; the optional bearer token."""

import json
from datetime import UTC, datetime

import pytest
import responses
from confluent_kafka import Consumer, Producer, TopicPartition

from reprocess.reprocess import reprocess_run_create
from usage_sync.aggregation import aggregate_usage
from usage_sync.models import RecordStatus, UsageRecord
from usage_sync.publishing import ensure_topic
from usage_sync.sync import sync_batch

NOW = datetime(2026, 11, 21, tzinfo=UTC)

pytestmark = [pytest.mark.django_db]


def events(*numbers: int) -> list[dict]:
    return [
        {
            "event_id": f"obs-{n}",
            "client_acct_id": f"ACME-{n % 3}",
            "usage_type_code": "API_CALLS",
            "usage_units": "1.5",
            "usage_date": "2026-11-20T09:10:00Z",
        }
        for n in numbers
    ]


def delta(before, after, name, **labels) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


@responses.activate
def test_each_step_moves_its_metrics_by_exactly_what_it_did(
    single_process, scrape, api_client, kafka, settings,
    django_capture_on_commit_callbacks,
):
    ensure_topic(timeout=10)
    before = scrape()

    # Ingest: 6 new events, then 2 of them again.
    with django_capture_on_commit_callbacks(execute=True):
        assert api_client.post("/api/v1/usage-events/", events(*range(6)), format="json"
                               ).status_code in (200, 201)
        assert api_client.post("/api/v1/usage-events/", events(0, 1), format="json"
                               ).status_code in (200, 201)
    ingested = scrape()
    assert delta(before, ingested, "allegro_events_ingested_total") == 6
    assert delta(before, ingested, "allegro_events_duplicate_total") == 2
    assert delta(before, ingested, "allegro_usage_events_unaggregated") == 6
    assert ingested.total("allegro_usage_events_stored") >= 6

    # Aggregation: one batch of 3 records (3 accounts, one window), all PENDING.
    [batch_id] = aggregate_usage(now=NOW).batch_ids
    aggregated = scrape()
    assert delta(ingested, aggregated, "allegro_usage_events_unaggregated") == -6
    assert delta(ingested, aggregated, "allegro_usage_records", status="PENDING") == 3
    assert delta(ingested, aggregated, "allegro_batches", status="PENDING") == 1
    assert delta(ingested, aggregated, "allegro_batches_incomplete", status="PENDING") == 1
    assert aggregated.total("allegro_oldest_pending_record_age_seconds") >= 0

    # Sync through a fake core Aria: one record rejected with 1009, two accepted.
    rejected = UsageRecord.objects.filter(batch_id=batch_id).order_by("id").first()
    responses.post(settings.ARIA_API_URL, json={
        "error_code": 0,
        "error_msg": "OK",
        "error_records": [{
            "out_client_record_id": rejected.client_record_id,
            "record_error_code": 1009,
            "record_error_msg": "account does not exist",
        }],
    })
    with django_capture_on_commit_callbacks(execute=True):
        sync_batch(batch_id=batch_id)
    [call] = responses.calls
    assert json.loads(call.request.body)["rest_call"] == "bulk_record_usage_m"
    synced = scrape()
    bulk = {"rest_call": "bulk_record_usage_m"}
    assert delta(aggregated, synced, "allegro_aria_calls_total", **bulk, error_code="0") == 1
    assert delta(aggregated, synced, "allegro_aria_call_seconds_count", **bulk) == 1
    assert delta(aggregated, synced, "allegro_aria_call_seconds_bucket", **bulk, le="+Inf") == 1
    assert delta(aggregated, synced, "allegro_record_outcomes_total",
                 status="COMPLETE", error_code="0") == 2
    assert delta(aggregated, synced, "allegro_record_outcomes_total",
                 status="ERROR", error_code="1009") == 1
    assert delta(aggregated, synced, "allegro_usage_records", status="PENDING") == -3
    assert delta(aggregated, synced, "allegro_usage_records", status="COMPLETE") == 2
    assert delta(aggregated, synced, "allegro_usage_records", status="ERROR") == 1
    assert delta(aggregated, synced, "allegro_batches_incomplete", status="ERROR") == 1
    assert delta(aggregated, synced, "allegro_batches_incomplete", status="PENDING") == -1

    # Reprocess the batch: its ERROR record is queued again and its id goes to Kafka.
    with django_capture_on_commit_callbacks(execute=True):
        run = reprocess_run_create(level="BATCH", batch_id=batch_id, actor="ops")
    assert run.records_selected == 1
    reprocessed = scrape()
    assert delta(synced, reprocessed, "allegro_reprocess_runs_total", level="BATCH") == 1
    assert delta(synced, reprocessed, "allegro_reprocess_runs_recorded", level="BATCH") == 1
    assert delta(synced, reprocessed, "allegro_reprocess_records_selected", level="BATCH") == 1
    assert delta(synced, reprocessed, "allegro_usage_records", status="ERROR") == -1
    assert delta(synced, reprocessed, "allegro_usage_records", status="PENDING") == 1
    # The group never committed: everything on the topic counts as lag.
    assert reprocessed.total("allegro_kafka_consumer_lag",
                             topic=settings.KAFKA_AGGREGATED_TOPIC) == 1
    assert reprocessed.total("allegro_collector_up", collector="kafka") == 1
    assert reprocessed.total("allegro_collector_up", collector="database") == 1


def test_it_counts_the_oldest_pending_record_from_its_batch(single_process,
                                                             scrape, api_client):
    from datetime import timedelta

    from django.utils import timezone

    from usage_sync.models import AggregatedBatch

    api_client.post("/api/v1/usage-events/", events(1, 2), format="json")
    [batch_id] = aggregate_usage(now=NOW).batch_ids
    AggregatedBatch.objects.filter(pk=batch_id).update(
        created_at=timezone.now() - timedelta(hours=2)
    )

    age = scrape().total("allegro_oldest_pending_record_age_seconds")

    assert 7200 <= age < 7200 + 60
    UsageRecord.objects.filter(batch_id=batch_id).update(status=RecordStatus.COMPLETE)
    AggregatedBatch.objects.filter(pk=batch_id).update(pending_count=0, completed_count=2)
    assert scrape().total("allegro_oldest_pending_record_age_seconds") == 0


def test_consumer_lag_is_what_the_group_has_not_committed_per_partition(
    single_process, scrape, kafka, settings
):
    settings.KAFKA_CONSUMER_GROUP = "lag-test-group"
    ensure_topic(partitions=3, timeout=10)
    topic = settings.KAFKA_AGGREGATED_TOPIC
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    produced = {0: 5, 1: 3, 2: 0}
    for partition, n in produced.items():
        for i in range(n):
            producer.produce(topic, value=str(i).encode(), partition=partition)
            # One record batch per message: tansu answers a partition's high watermark
            # as the base offset of its last record batch + 1 (Kafka: last offset + 1).
            assert producer.flush(10) == 0
    # The group finished 2 messages of partition 0 and all 3 of partition 1.
    consumer = Consumer({
        "bootstrap.servers": kafka.bootstrap,
        "group.id": "lag-test-group",
        "enable.auto.commit": False,
    })
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, 0, 2), TopicPartition(topic, 1, 3)],
            asynchronous=False,
        )
    finally:
        consumer.close()

    metrics = scrape()

    assert metrics.total("allegro_collector_up", collector="kafka") == 1
    lag = {p: metrics.total("allegro_kafka_consumer_lag", topic=topic, partition=str(p))
           for p in produced}
    assert lag == {0: 3, 1: 0, 2: 0}
    assert metrics.total("allegro_kafka_high_watermark", topic=topic, partition="0") == 5
    assert metrics.total("allegro_kafka_committed_offset", topic=topic, partition="0") == 2
    # Never committed on partition 2: no committed offset sample, the lag counts from the start.
    assert not metrics.has("allegro_kafka_committed_offset", topic=topic, partition="2")


def test_an_unreachable_broker_reports_down_and_the_scrape_still_answers(
    single_process, scrape, broker_down
):
    metrics = scrape()

    assert metrics.total("allegro_collector_up", collector="kafka") == 0
    assert metrics.total("allegro_collector_up", collector="database") == 1
    assert not metrics.has("allegro_kafka_consumer_lag")
    assert metrics.has("allegro_usage_records", status="PENDING")
    assert metrics.total("allegro_collector_duration_seconds", collector="kafka") < 3


def test_with_metrics_token_set_it_wants_the_bearer_token(
    single_process, client, scrape, settings, broker_down
):
    settings.METRICS_TOKEN = "scrape-me-please"

    anonymous = client.get("/metrics")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope")

    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert scrape(HTTP_AUTHORIZATION="Bearer scrape-me-please").has("allegro_usage_records")


def test_without_metrics_token_anyone_on_the_network_may_scrape(
    single_process, scrape, settings, broker_down
):
    settings.METRICS_TOKEN = ""

    assert scrape().has("allegro_collector_up", collector="database")


def test_an_unreadable_database_reports_down_and_the_scrape_still_answers(
    single_process, scrape, broker_down, monkeypatch
):
    from django.db import OperationalError

    from allegro import metrics as served

    def database_down():
        raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")

    monkeypatch.setattr(served, "database_families", database_down)

    metrics = scrape()

    assert metrics.total("allegro_collector_up", collector="database") == 0
    assert not metrics.has("allegro_usage_records")
    assert metrics.has("allegro_collector_up", collector="kafka")
