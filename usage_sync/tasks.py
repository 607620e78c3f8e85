"""Celery tasks: thin wrappers that call the domain functions."""

import logging

from celery import shared_task
from django.utils import timezone

from .aggregation import aggregate_usage
from .models import AggregationConfig

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def aggregate_usage_if_due() -> None:
    """Run aggregation when the configured frequency says a run is due (beat ticks often)."""
    now = timezone.now()
    if AggregationConfig.load().is_due(now):
        aggregate_usage(now=now)
