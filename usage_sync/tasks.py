"""Celery tasks: thin wrappers that call the domain functions."""

import logging

import redis
from celery import shared_task
from celery.signals import worker_ready, worker_shutting_down
from django.conf import settings
from django.utils import timezone

from . import consumer, publishing
from .aggregation import aggregate_usage
from .models import AggregationConfig

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def aggregate_usage_if_due() -> None:
    """Run aggregation when the configured frequency says a run is due (beat ticks often)."""
    now = timezone.now()
    if AggregationConfig.load().is_due(now):
        result = aggregate_usage(now=now)
        # aggregate_usage has committed: publish now; the sweep covers a failure here.
        publish_batch_ids(result.batch_ids)


def publish_batch_ids(batch_ids: list[int]) -> None:
    try:
        publishing.publish_batches(batch_ids)
    except Exception:
        logger.exception("publishing %d batches failed; the sweep will retry", len(batch_ids))


@shared_task(ignore_result=True)
def publish_due_batches() -> None:
    """Publish batches never published, lost in transit, or due for a transport retry."""
    published = publishing.publish_due_batches()
    if published:
        logger.info("sweep published %d batches", len(published))


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def _stop_key(hostname: str) -> str:
    return f"allegro:sync-consumer:stop:{hostname}"


@worker_ready.connect
def _clear_stop_flag(sender=None, **kwargs):
    _redis().delete(_stop_key(sender.hostname))


@worker_shutting_down.connect
def _raise_stop_flag(sender=None, **kwargs):
    # The consumer runs in a pool child; the flag tells it to close and let go.
    _redis().set(_stop_key(str(sender)), 1, ex=600)


def _free_consumer_slot(client: redis.Redis, hostname: str, *, timeout: float):
    """Take one of the worker's SYNC_CONSUMERS_PER_WORKER consumer slots, or None."""
    for slot in range(settings.SYNC_CONSUMERS_PER_WORKER):
        lock = client.lock(f"allegro:sync-consumer:{hostname}:{slot}", timeout=timeout,
                           blocking=False)
        if lock.acquire():
            return lock
    return None


@shared_task(bind=True, ignore_result=True)
def consume_aggregated_batches(self) -> None:
    """Consume batch ids and sync them; up to N consumers per worker, restarted by beat.

    Sync calls are synchronous and mostly wait on core Aria and the database, so a worker
    runs SYNC_CONSUMERS_PER_WORKER of them side by side (its pool needs one slot more,
    for the sweep and aggregation).
    """
    hostname = self.request.hostname or "local"
    lifetime = settings.SYNC_CONSUMER_LIFETIME_SECONDS
    client = _redis()
    lock = _free_consumer_slot(client, hostname, timeout=lifetime + 60)
    if lock is None:
        return  # this worker already runs all the consumers it may
    stop_key = _stop_key(hostname)

    def should_stop() -> bool:
        # A lost slot (Redis restarted empty) means beat may start another consumer in
        # it: stop, so a worker never runs more consumers than its pool has slots for.
        return client.exists(stop_key) > 0 or not lock.owned()

    try:
        handled = consumer.consume_batches(should_stop=should_stop, max_seconds=lifetime)
        logger.info("consumer on %s handled %d batch ids", hostname, handled)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # already gone with a Redis restart; nothing of ours to release
