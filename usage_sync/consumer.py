"""Consume aggregated batch ids from Kafka and sync each batch.

Delivery guarantee: at-least-once. The offset of a message is committed only after
sync_batch has committed the batch's outcome to the database; a crash in between means
the id is delivered again, and sync_batch's claim and PENDING-only selection make the
second handling harmless.

Each Celery worker runs SYNC_CONSUMERS_PER_WORKER consumers as processes of their own beside
its pool (`ConsumerProcesses`, started by a worker bootstep in allegro/celery.py), for the
worker's whole life: they take no pool slot, so aggregation, the sweep and reprocess always
have the pool, whatever concurrency the worker was started with; and they stay in the
consumer group until the worker shuts down, so the group rebalances only when workers come
and go.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from django.conf import settings
from django.db import close_old_connections

from . import metrics
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


def consumer_config(*, member: str | None = None) -> dict:
    """The consumer's settings; `member` makes it a static member of the group.

    A worker's consumers are static members named after the worker and their slot: a
    worker that restarts takes its partitions back without a rebalance of the whole group,
    and a broker that mishandles members leaving and joining (tansu elected a member that
    had left as the group's leader, so no assignment ever came) is not asked to. A member
    that does not come back loses its partitions after KAFKA_SESSION_TIMEOUT_MS.
    """
    config = {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "group.id": settings.KAFKA_CONSUMER_GROUP,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": settings.KAFKA_PARTITION_ASSIGNMENT_STRATEGY,
        # A sync call may take minutes (Aria's own advice on timeouts).
        "max.poll.interval.ms": settings.KAFKA_MAX_POLL_INTERVAL_MS,
        "session.timeout.ms": settings.KAFKA_SESSION_TIMEOUT_MS,
    }
    if member:
        config["group.instance.id"] = member
    return config


def consume_batches(
    *,
    should_stop: Callable[[], bool],
    max_seconds: float | None = None,
    client: AriaClient | None = None,
    member: str | None = None,
) -> int:
    """Sync every batch id read from the topic until told to stop; return how many."""
    consumer = Consumer(consumer_config(member=member))
    consumer.subscribe([settings.KAFKA_AGGREGATED_TOPIC])
    logger.info("consumer %s subscribed to %s as %s", os.getpid(),
                settings.KAFKA_AGGREGATED_TOPIC, member or "a dynamic member")
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
                try:
                    result = sync_batch(batch_id=decoded.batch_id, client=client)
                except Exception:
                    # sync_batch logged it and gave the batch back for a retry with backoff
                    # (or its claim goes stale): the sweep sends it again. Restarting the
                    # consumer would only redeliver it at once, over and over.
                    logger.exception("batch %s: sync failed; the sweep retries it",
                                     decoded.batch_id, extra={"batch_id": decoded.batch_id})
                else:
                    logger.info("batch %s: %s", decoded.batch_id, result.outcome,
                                extra={"batch_id": decoded.batch_id})
                handled += 1
            # After the database transaction, never before.
            _commit(consumer, message)
    finally:
        consumer.close()
    return handled


def _commit(consumer: Consumer, message: Message) -> None:
    try:
        consumer.commit(message=message, asynchronous=False)
    except KafkaException as exc:
        # The group moved the partition on meanwhile (this consumer overran
        # max.poll.interval during a long call, or a rebalance is under way): the new
        # owner gets the message again, and the batch's claim makes that harmless.
        logger.warning("offset %s of partition %s not committed (%s); it is delivered again",
                       message.offset(), message.partition(), exc.args[0])


class ConsumerProcesses:
    """Keep `count` consumer processes (manage.py consume_batches) running, restarting any
    that dies, until stop(). Started in the worker's main process, outside its pool. With a
    `worker_name`, each is the static group member "<worker name>/sync-<slot>"."""

    CHECK_EVERY_SECONDS = 1.0
    # A consumer that died is restarted after this pause, so a crash loop cannot spin.
    RESTART_DELAY_SECONDS = 5.0

    def __init__(self, count: int, *, stop_timeout: float, worker_name: str = ""):
        self.count = count
        self.worker_name = worker_name
        self.stop_timeout = stop_timeout
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.restart_at = [0.0] * count
        self.stopping = False

    def command(self, slot: int) -> list[str]:
        # python -m django: no manage.py needed; DJANGO_SETTINGS_MODULE is in the
        # environment (allegro/celery.py sets it). --parent lets the child notice our death.
        command = [sys.executable, "-m", "django", "consume_batches",
                   "--parent", str(os.getpid())]
        if self.worker_name:
            command += ["--member", f"{self.worker_name}/sync-{slot}"]
        return command

    def check(self) -> None:
        """Start the consumers that are not running."""
        for slot, process in enumerate(self.processes):
            if self.stopping or (process is not None and process.poll() is None):
                continue
            if process is not None:
                logger.error("sync consumer %d exited with %s; restarting it", slot,
                             process.returncode)
                metrics.mark_process_dead(process.pid)
                self.processes[slot] = None
                self.restart_at[slot] = time.monotonic() + self.RESTART_DELAY_SECONDS
            if time.monotonic() >= self.restart_at[slot]:
                self.processes[slot] = subprocess.Popen(self.command(slot))

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM each: it finishes the batch in hand, leaves the group and exits."""
        self.stopping = True
        running = [p for p in self.processes if p is not None and p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                # Killed mid-call, its records stay in doubt and are settled later.
                logger.warning("sync consumer %s did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        for process in running:
            metrics.mark_process_dead(process.pid)
