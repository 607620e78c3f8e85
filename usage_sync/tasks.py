"""Celery tasks: thin wrappers that call the domain functions."""

import logging

from celery import shared_task
from django.utils import timezone

from . import publishing
from .aggregation import aggregate_and_publish
from .models import AggregationConfig

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def aggregate_usage_if_due() -> None:
    """Run aggregation when the configured frequency says a run is due (beat ticks often)."""
    now = timezone.now()
    if AggregationConfig.load().is_due(now):
        aggregate_and_publish(now=now, actor="scheduler")


@shared_task(ignore_result=True)
def publish_due_batches() -> None:
    """Publish batches never published, lost in transit, or due for a transport retry."""
    published = publishing.publish_due_batches()
    if published:
        logger.info("sweep published %d batches", len(published))
