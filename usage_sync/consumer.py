"""Consume aggregated batch ids from Kafka and sync each batch.

Delivery guarantee: at-least-once. The offset of a message is committed only after
sync_batch has committed the batch's outcome to the database; a crash in between means
the id is delivered again, and sync_batch's claim and PENDING-only selection make the
second handling harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, Message
from django.conf import settings
from django.db import close_old_connections

from .billing import AriaClient
from .sync import sync_batch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchMessage:
    """A decoded message: the id of the batch to sync."""

    batch_id: int

    @classmethod
    def decode(cls, message: Message) -> BatchMessage | None:
        try:
            return cls(batch_id=int(message.value()))
        except (TypeError, ValueError):
            return None


def consumer_config() -> dict:
    # Dynamic group membership on purpose: a dead member's partitions move to the others
    # after the session timeout. (Static membership kept them from a restarted worker
    # on the tansu broker.)
    return {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "group.id": settings.KAFKA_CONSUMER_GROUP,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # A sync call may take minutes (Aria's own advice on timeouts).
        "max.poll.interval.ms": int(max(settings.ARIA_TIMEOUT_SECONDS * 3, 300) * 1000),
        "session.timeout.ms": settings.KAFKA_SESSION_TIMEOUT_MS,
    }


def consume_batches(
    *,
    should_stop: Callable[[], bool],
    max_seconds: float | None = None,
    client: AriaClient | None = None,
) -> int:
    """Sync every batch id read from the topic until told to stop; return how many."""
    consumer = Consumer(consumer_config())
    consumer.subscribe([settings.KAFKA_AGGREGATED_TOPIC])
    client = client or AriaClient()
    deadline = time.monotonic() + max_seconds if max_seconds else None
    handled = 0
    try:
        while not should_stop() and (deadline is None or time.monotonic() < deadline):
            message = consumer.poll(1.0)
            if message is None:
                continue
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    logger.warning("kafka consumer error: %s", message.error())
                continue
            decoded = BatchMessage.decode(message)
            if decoded is None:
                logger.error("skipping undecodable message %r at %s", message.value(),
                             message.offset())
            else:
                close_old_connections()
                result = sync_batch(batch_id=decoded.batch_id, client=client)
                logger.info("batch %s: %s", decoded.batch_id, result.outcome)
                handled += 1
            # After the database transaction, never before.
            consumer.commit(message=message, asynchronous=False)
    finally:
        consumer.close()
    return handled
