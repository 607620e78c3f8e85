"""Publish aggregated batch ids to the internal Kafka topic, and sweep for stragglers.

The database is the source of truth; Kafka only carries batch ids. A batch is marked
`published_at` when the broker acknowledged its id. Whatever was committed but never
published (process died, broker down), was published but never consumed (an in-memory
broker restarted), or is due for a transport retry, is found by `publish_due_batches`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from django.conf import settings
from django.db.models import Case, F, Q, When
from django.utils import timezone

from .models import AggregatedBatch

logger = logging.getLogger(__name__)


def producer_config(timeout_seconds: float) -> dict:
    return {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "enable.idempotence": True,
        "acks": "all",
        # Give up within the call's own deadline: the sweep retries, nothing is lost.
        "message.timeout.ms": int(timeout_seconds * 1000),
        "socket.timeout.ms": max(int(timeout_seconds * 1000), 1000),
    }


def ensure_topic(*, partitions: int | None = None, timeout: float = 10.0) -> None:
    """Create the aggregated-batch topic if the broker does not have it yet."""
    topic = settings.KAFKA_AGGREGATED_TOPIC
    admin = AdminClient({"bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS})
    if topic in admin.list_topics(timeout=timeout).topics:
        return
    partitions = partitions or settings.KAFKA_AGGREGATED_TOPIC_PARTITIONS
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions)])
    try:
        futures[topic].result(timeout)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


def publish_batches(batch_ids: Iterable[int], *, timeout: float = 10.0) -> list[int]:
    """Send each batch id (key = value = the id); mark and return the acknowledged ones."""
    batch_ids = list(batch_ids)
    if not batch_ids:
        return []
    started = timezone.now()
    delivered: list[int] = []

    def on_delivery(error, message):
        if error is None:
            delivered.append(int(message.key()))
        else:
            logger.warning("batch %s not published: %s", message.key(), error)

    topic = settings.KAFKA_AGGREGATED_TOPIC
    try:
        # A fresh (or restarted in-memory) broker may not have the topic yet.
        ensure_topic(timeout=timeout)
    except KafkaException as exc:
        logger.warning("broker unavailable (%s): %d batch ids wait for the sweep", exc,
                       len(batch_ids))
        return []
    producer = Producer(producer_config(timeout))
    for batch_id in batch_ids:
        key = str(batch_id).encode()
        while True:
            try:
                producer.produce(topic, key=key, value=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.5)  # local queue full: let deliveries drain
    left = producer.flush(timeout)
    if left:
        logger.warning("%d batch ids not acknowledged within %ss; the sweep retries", left, timeout)
        producer.purge()
        producer.flush(0)
    if delivered:
        # A retry that was due is now on its way; one a consumer set meanwhile (a new
        # failure, or records in doubt waiting to settle) stays for the sweep.
        AggregatedBatch.objects.filter(id__in=delivered).update(
            published_at=timezone.now(),
            next_retry_at=Case(When(next_retry_at__gt=started, then=F("next_retry_at"))),
        )
    return delivered


def due_batches(now=None):
    """Batches with PENDING records that should go (again) onto the topic now."""
    now = now or timezone.now()
    republish_before = now - timedelta(seconds=settings.SYNC_REPUBLISH_AFTER_SECONDS)
    never_or_long_ago = Q(next_retry_at__isnull=True) & (
        Q(published_at__isnull=True) | Q(published_at__lt=republish_before)
    )
    retry_due = Q(next_retry_at__lte=now)
    return (
        AggregatedBatch.objects.claimable(now)
        .filter(never_or_long_ago | retry_due, pending_count__gt=0)
        .order_by("window_start", "sequence")
    )


def publish_due_batches(*, limit: int = 10_000, timeout: float = 10.0) -> list[int]:
    """Publish what the sweep finds due; return the ids acknowledged by the broker."""
    ids = list(due_batches().values_list("id", flat=True)[:limit])
    return publish_batches(ids, timeout=timeout)
