from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from tests.factories import UsageEventFactory
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
