"""The consumer commits an offset only after the batch's outcome is in the database."""

import sys
import time
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer, TopicPartition
from django.conf import settings

from tests.factories import UsageEventFactory
from usage_sync import consumer
from usage_sync.aggregation import aggregate_usage
from usage_sync.publishing import publish_batches
from usage_sync.sync import Outcome, SyncResult

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(kafka, settings):
    settings.KAFKA_CONSUMER_GROUP = f"group-{settings.KAFKA_AGGREGATED_TOPIC}"
    settings.KAFKA_SESSION_TIMEOUT_MS = 6000
    for hour in range(3):
        UsageEventFactory(usage_date=datetime(2026, 11, 20, hour, tzinfo=UTC))
    batch_ids = aggregate_usage(now=datetime(2026, 11, 21, tzinfo=UTC)).batch_ids
    assert sorted(publish_batches(batch_ids)) == batch_ids
    return batch_ids


def consume(until_handled: int, handle, max_seconds: float = 60) -> list[int]:
    seen = []

    def fake_sync_batch(*, batch_id, client):
        seen.append(batch_id)
        return handle(batch_id)

    original = consumer.sync_batch
    consumer.sync_batch = fake_sync_batch
    try:
        consumer.consume_batches(
            should_stop=lambda: len(seen) >= until_handled, max_seconds=max_seconds,
            client=object(),
        )
    finally:
        consumer.sync_batch = original
    return seen


def committed_messages() -> int:
    """Sum the group's committed offsets over the topic's partitions."""
    reader = Consumer(
        {
            "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
            "group.id": settings.KAFKA_CONSUMER_GROUP,
        }
    )
    topic = settings.KAFKA_AGGREGATED_TOPIC
    partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
    offsets = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    reader.close()
    return sum(max(tp.offset, 0) for tp in offsets)


def test_each_batch_id_is_handled_and_its_offset_committed(published):
    assert sorted(consume(3, lambda b: SyncResult(Outcome.SYNCED, b))) == published
    assert committed_messages() == 3


def test_a_process_dying_before_the_database_commit_leaves_the_offset_for_redelivery(
    published
):
    def crash(batch_id):
        raise SystemExit("the consumer is killed before the outcome was stored")

    with pytest.raises(SystemExit):
        consume(1, crash)

    assert committed_messages() == 0
    redelivered = consume(3, lambda b: SyncResult(Outcome.SYNCED, b))
    assert sorted(redelivered) == published
    assert committed_messages() == 3


def test_a_consumer_that_overran_its_poll_interval_rejoins_and_the_message_comes_again(
    published, settings, caplog
):
    # librdkafka's floor: max.poll.interval.ms must be at least session.timeout.ms.
    settings.KAFKA_MAX_POLL_INTERVAL_MS = settings.KAFKA_SESSION_TIMEOUT_MS = 6000
    slow = [published[0]]

    def handle(batch_id):
        if batch_id in slow:
            slow.remove(batch_id)
            time.sleep(8)  # one sync longer than the poll interval: the group lets us go
        return SyncResult(Outcome.SYNCED, batch_id)

    seen = consume(4, handle, max_seconds=90)

    # The slow batch came back (its offset could not be committed), nothing was lost.
    assert sorted(set(seen)) == published
    assert seen.count(published[0]) == 2
    assert "not committed" in caplog.text
    assert committed_messages() == 3


class Sleepers(consumer.ConsumerProcesses):
    RESTART_DELAY_SECONDS = 0.2

    def command(self, slot):
        return [sys.executable, "-c", "import time; time.sleep(60)"]


def test_the_worker_keeps_its_consumers_running_and_stops_them_on_shutdown():
    consumers = Sleepers(2, stop_timeout=5)
    consumers.check()
    first = [p.pid for p in consumers.processes]
    consumers.processes[0].kill()
    consumers.processes[0].wait()

    consumers.check()  # notices the death
    time.sleep(0.3)
    consumers.check()  # restarts it after the pause

    assert all(p.poll() is None for p in consumers.processes)
    assert consumers.processes[0].pid != first[0] and consumers.processes[1].pid == first[1]
    consumers.stop()
    assert all(p.poll() is not None for p in consumers.processes)
    consumers.check()  # a stopping worker starts nothing
    assert all(p.poll() is not None for p in consumers.processes)


def test_a_batch_whose_sync_fails_unexpectedly_does_not_stop_the_consumer(published, caplog):
    def handle(batch_id):
        if batch_id == published[0]:
            raise RuntimeError("the database went away")
        return SyncResult(Outcome.SYNCED, batch_id)

    seen = consume(3, handle)

    # Given back for a retry by sync_batch, the failed batch is the sweep's again; the
    # others were synced, and every offset committed.
    assert sorted(seen) == published
    assert "sync failed; the sweep retries it" in caplog.text
    assert committed_messages() == 3
