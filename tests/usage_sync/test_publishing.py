"""Publishing batch ids to a real broker, and the sweep that finds what is due."""

import io
import time
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from tests.factories import UsageEventFactory
from usage_sync import tasks
from usage_sync.aggregation import aggregate_usage
from usage_sync.models import AggregatedBatch, BatchStatus
from usage_sync.publishing import due_batches, publish_batches, publish_due_batches

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def read_topic(expected: int, timeout: float = 30) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
            "group.id": "test-reader",
            "auto.offset.reset": "earliest",
        }
    )
    # Read every partition from the start without joining a group (joins are slow).
    topic = settings.KAFKA_AGGREGATED_TOPIC
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    messages, deadline = [], time.monotonic() + timeout
    while len(messages) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            messages.append((message.key(), message.value()))
    consumer.close()
    return messages


def make_batches(n: int) -> list[int]:
    for i in range(n):
        UsageEventFactory(usage_date=datetime(2026, 11, 20, i, tzinfo=UTC))
    return aggregate_usage(now=NOW).batch_ids


def test_published_batch_ids_are_on_the_topic_and_marked(kafka):
    batch_ids = make_batches(3)

    assert sorted(publish_batches(batch_ids)) == batch_ids

    messages = read_topic(3)
    assert sorted(messages) == sorted((str(i).encode(), str(i).encode()) for i in batch_ids)
    assert not AggregatedBatch.objects.filter(published_at__isnull=True).exists()


def test_with_the_broker_down_nothing_is_marked_and_the_sweep_finds_them(kafka):
    batch_ids = make_batches(2)
    kafka.stop()

    assert publish_batches(batch_ids, timeout=1) == []

    assert sorted(due_batches().values_list("id", flat=True)) == batch_ids
    kafka.start()
    assert sorted(publish_due_batches()) == batch_ids
    assert due_batches().count() == 0


def test_the_aggregation_task_publishes_the_new_batches(kafka):
    UsageEventFactory(usage_date=timezone.now() - timedelta(days=1))

    tasks.aggregate_usage_if_due()

    [batch] = AggregatedBatch.objects.all()
    assert batch.published_at is not None
    assert read_topic(1) == [(str(batch.id).encode(), str(batch.id).encode())]


def test_a_manual_aggregation_publishes_its_batches_too(kafka):
    UsageEventFactory(usage_date=timezone.now() - timedelta(days=1))

    call_command("aggregate_usage", stdout=io.StringIO())

    [batch] = AggregatedBatch.objects.all()
    assert batch.published_at is not None
    assert read_topic(1) == [(str(batch.id).encode(), str(batch.id).encode())]


def test_publishing_clears_a_due_retry_but_not_one_set_for_later(kafka):
    due, later = make_batches(2)
    now = timezone.now()
    AggregatedBatch.objects.filter(id=due).update(next_retry_at=now - timedelta(seconds=1))
    # Set by a consumer meanwhile (a new failure, records in doubt to settle): clearing it
    # would leave the batch to the 10-minute lost-message sweep.
    AggregatedBatch.objects.filter(id=later).update(next_retry_at=now + timedelta(minutes=5))

    assert sorted(publish_batches([due, later])) == [due, later]

    retries = dict(AggregatedBatch.objects.values_list("id", "next_retry_at"))
    assert retries[due] is None
    assert retries[later] > now


def test_the_sweep_picks_what_is_due_and_leaves_the_rest(settings):
    settings.SYNC_REPUBLISH_AFTER_SECONDS = 600
    settings.SYNC_CLAIM_STALE_SECONDS = 180
    ids = make_batches(6)
    now = timezone.now()
    never, lost, retry_due, retry_later, in_process, errored_only = ids
    AggregatedBatch.objects.filter(id=lost).update(published_at=now - timedelta(minutes=11))
    AggregatedBatch.objects.filter(id=retry_due).update(
        published_at=now, next_retry_at=now - timedelta(seconds=1)
    )
    AggregatedBatch.objects.filter(id=retry_later).update(
        published_at=now, next_retry_at=now + timedelta(minutes=1)
    )
    AggregatedBatch.objects.filter(id=in_process).update(
        status=BatchStatus.IN_PROCESS, sync_started_at=now
    )
    AggregatedBatch.objects.filter(id=errored_only).update(
        published_at=now - timedelta(hours=1),
        pending_count=0,
        error_count=1,
        status=BatchStatus.ERROR,
    )

    assert sorted(due_batches().values_list("id", flat=True)) == [never, lost, retry_due]
