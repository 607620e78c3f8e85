from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from tests.factories import UsageEventFactory
from tests.services import redis_db_url
from usage_sync import tasks
from usage_sync.models import AggregationConfig, UsageRecord

pytestmark = pytest.mark.django_db


def test_beat_schedules_the_aggregation_check():
    entry = settings.CELERY_BEAT_SCHEDULE["aggregate-usage"]
    assert entry["task"] == "usage_sync.tasks.aggregate_usage_if_due"
    # Beat ticks more often than the shortest frequency; the task decides if a run is due.
    assert entry["schedule"] <= 5 * 60


def test_the_task_aggregates_when_a_run_is_due(kafka):
    UsageEventFactory(usage_date=timezone.now() - timedelta(days=1))

    tasks.aggregate_usage_if_due()

    assert UsageRecord.objects.count() == 1
    assert AggregationConfig.load().last_run_at is not None


def test_the_task_waits_for_the_configured_frequency():
    config = AggregationConfig.load()
    config.frequency_minutes = 60
    config.last_run_at = timezone.now() - timedelta(minutes=30)
    config.save()
    UsageEventFactory(usage_date=timezone.now() - timedelta(days=1))

    tasks.aggregate_usage_if_due()

    assert UsageRecord.objects.count() == 0


def test_a_disabled_configuration_never_runs():
    config = AggregationConfig.load()
    config.enabled = False
    config.save()

    assert not config.is_due(datetime(2030, 1, 1, tzinfo=UTC))


REDIS_TEST_URL = redis_db_url(14)


@pytest.fixture
def slot_redis(settings):
    settings.REDIS_URL = REDIS_TEST_URL
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield client
    client.flushdb()


def run_consumer_task(monkeypatch, on_poll):
    """Run the consumer task with consume_batches replaced by a loop that polls
    should_stop, calling on_poll(poll number) first; return how many polls it made."""
    polls = []

    def fake_consume_batches(*, should_stop, max_seconds):
        while len(polls) < 50:
            polls.append(True)
            on_poll(len(polls))
            if should_stop():
                return 0
        return 0

    monkeypatch.setattr(tasks.consumer, "consume_batches", fake_consume_batches)
    tasks.consume_aggregated_batches.apply().get()
    return len(polls)


def test_a_consumer_stops_when_its_slot_lock_is_gone(slot_redis, monkeypatch):
    # Redis restarted empty: the slot is free for another consumer, so this one stops.
    polls = run_consumer_task(monkeypatch, lambda n: n == 3 and slot_redis.flushdb())

    assert polls == 3
    assert slot_redis.keys("allegro:sync-consumer:*") == []


def test_a_consumer_keeps_going_while_it_holds_its_slot(slot_redis, monkeypatch):
    held = []
    polls = run_consumer_task(
        monkeypatch, lambda n: held.append(len(slot_redis.keys("allegro:sync-consumer:*:0")))
    )

    assert polls == 50
    assert set(held) == {1}
    assert slot_redis.keys("allegro:sync-consumer:*") == []  # released at the end
