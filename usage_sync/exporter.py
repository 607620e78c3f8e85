"""The pipeline's values read at scrape time (allegro/metrics.py serves them).

Values that live elsewhere are read when Prometheus asks, so any process answers the
same and nothing goes stale:
- the database, by a few aggregate queries (database_families states their cost);
- the broker: the sync consumer group's committed offset against the high watermark of
  each partition of the batch-id topic.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition
from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, Q, Sum
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from .models import (
    INCOMPLETE,
    AggregatedBatch,
    BatchStatus,
    RecordStatus,
    UsageEvent,
    UsageRecord,
)

logger = logging.getLogger(__name__)


def database_families() -> list:
    """The pipeline's counts read from the database at scrape time, in cheap queries.

    Cost (the database may hold millions of records):
    1. One pass over the batch table (not the record table): records by status are the
       sums of each batch's maintained counters, which the sync and reprocess update in
       the same transaction as the records. There are batch-size times fewer batches
       than records (1,000 batches for 1M records at the default batch size). The same
       pass counts batches by status, the incomplete ones, and the oldest with PENDING
       records.
    2. Unaggregated events: those of OPEN records (the sum of their event counts, over the
       open records' own index: one per key of the windows not closed yet), and any stored
       without a record (the partial index `event_unaggregated_idx`, normally empty). Stored
       events: PostgreSQL's own row estimate (pg_class.reltuples, kept fresh by
       autovacuum), not a COUNT(*) over millions of rows.
    """
    return [*_batch_families(), *_event_families()]


def _batch_families() -> list:
    records = GaugeMetricFamily(
        "allegro_usage_records",
        "Aggregated usage records by sync status (INCOMPLETE ones count as ERROR).",
        labels=["status"],
    )
    batches = GaugeMetricFamily(
        "allegro_batches", "Aggregated batches by status.", labels=["status"]
    )
    incomplete = GaugeMetricFamily(
        "allegro_batches_incomplete",
        "Batches with PENDING or ERROR records, by batch status.",
        labels=["status"],
    )
    oldest = GaugeMetricFamily(
        "allegro_oldest_pending_record_age_seconds",
        "Age of the oldest batch that still has PENDING records (0 if none): how long "
        "records have waited since aggregation created them.",
    )
    rows = (
        AggregatedBatch.objects.order_by()
        .values("status")
        .annotate(
            batches=Count("id"),
            incomplete=Count("id", filter=INCOMPLETE),
            pending=Sum("pending_count"),
            complete=Sum("completed_count"),
            error=Sum("error_count"),
            ignored=Sum("ignored_count"),
            oldest_pending=Min("created_at", filter=Q(pending_count__gt=0)),
        )
    )
    by_status = {"pending": 0, "complete": 0, "error": 0, "ignored": 0}
    batch_counts = dict.fromkeys(BatchStatus.values, 0)
    # A COMPLETE batch has nothing left to do: its status is derived from its counts.
    incomplete_counts = dict.fromkeys(
        [BatchStatus.PENDING, BatchStatus.IN_PROCESS, BatchStatus.ERROR], 0
    )
    oldest_pending = None
    for row in rows:
        batch_counts[row["status"]] = row["batches"]
        if row["incomplete"]:
            incomplete_counts[row["status"]] = row["incomplete"]
        for key in by_status:
            by_status[key] += row[key] or 0
        if row["oldest_pending"] and (
            oldest_pending is None or row["oldest_pending"] < oldest_pending
        ):
            oldest_pending = row["oldest_pending"]
    for status, key in [
        (RecordStatus.PENDING, "pending"),
        (RecordStatus.COMPLETE, "complete"),
        (RecordStatus.ERROR, "error"),
        (RecordStatus.IGNORED, "ignored"),
    ]:
        records.add_metric([status], by_status[key])
    for status, n in batch_counts.items():
        batches.add_metric([status], n)
    for status, n in incomplete_counts.items():
        incomplete.add_metric([status], n)
    age = (timezone.now() - oldest_pending).total_seconds() if oldest_pending else 0
    oldest.add_metric([], max(age, 0))
    return [records, batches, incomplete, oldest]


def _event_families() -> list:
    unaggregated = GaugeMetricFamily(
        "allegro_usage_events_unaggregated",
        "Raw usage events whose record is in no batch yet (its window has not closed).",
    )
    in_open_records = UsageRecord.objects.filter(batch__isnull=True).aggregate(
        n=Sum("event_count")
    )["n"] or 0
    unaggregated.add_metric(
        [], in_open_records + UsageEvent.objects.filter(record__isnull=True).count()
    )
    stored = GaugeMetricFamily(
        "allegro_usage_events_stored",
        "Raw usage events stored (on PostgreSQL the planner's row estimate).",
    )
    stored.add_metric([], _stored_events())
    return [unaggregated, stored]


def _stored_events() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [UsageEvent._meta.db_table],
        )
        estimate = cursor.fetchone()[0]
    if estimate >= 0:
        return estimate
    # -1: never vacuumed or analyzed yet, so the table is new and small.
    return UsageEvent.objects.count()


def kafka_lag_families() -> list:
    """Consumer lag of the sync group per partition of the batch-id topic.

    Lag = high watermark - committed offset: batch ids on the topic that no sync worker
    has finished yet. A partition the group never committed on counts from its low
    watermark (the consumers start from the earliest offset). The broker requests are
    bounded by METRICS_KAFKA_TIMEOUT_SECONDS in all.
    """
    topic = settings.KAFKA_AGGREGATED_TOPIC
    lag = GaugeMetricFamily(
        "allegro_kafka_consumer_lag",
        "Batch ids on the topic the sync consumer group has not committed yet.",
        labels=["topic", "partition"],
    )
    committed = GaugeMetricFamily(
        "allegro_kafka_committed_offset",
        "The sync consumer group's committed offset (absent if it never committed).",
        labels=["topic", "partition"],
    )
    high = GaugeMetricFamily(
        "allegro_kafka_high_watermark",
        "The partition's high watermark: the offset the next published batch id gets.",
        labels=["topic", "partition"],
    )
    offsets = partition_offsets(timeout=settings.METRICS_KAFKA_TIMEOUT_SECONDS)
    for partition, (low, high_mark, offset) in sorted(offsets.items()):
        labels = [topic, str(partition)]
        high.add_metric(labels, high_mark)
        if offset >= 0:
            committed.add_metric(labels, offset)
        lag.add_metric(labels, max(high_mark - (offset if offset >= 0 else low), 0))
    return [lag, committed, high]


def partition_offsets(*, timeout: float) -> dict[int, tuple[int, int, int]]:
    """Return {partition: (low watermark, high watermark, committed offset or -1)}.

    Raise KafkaException if the broker does not answer within `timeout` seconds in all.
    A missing topic has no partitions: {}.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KafkaException(f"no answer within {timeout:g}s")
        return remaining

    topic = settings.KAFKA_AGGREGATED_TOPIC
    consumer = Consumer(
        {
            "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
            # Reads the group's committed offsets; never subscribes, so never joins it.
            "group.id": settings.KAFKA_CONSUMER_GROUP,
            "enable.auto.commit": False,
            "socket.timeout.ms": max(int(timeout * 1000), 1000),
            # Not librdkafka's error line for every connection attempt of every scrape
            # while the broker is down: the collector logs one warning per scrape.
            "log_level": 2,
            "logger": logging.getLogger("usage_sync.exporter.librdkafka"),
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=left())
        if not metadata.brokers:
            raise KafkaException("the broker answered without any broker in its metadata")
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return {}
        partitions = [TopicPartition(topic, p) for p in sorted(found.partitions)]
        committed = {
            tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=left())
        }
        result = {}
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=left(), cached=False)
            offset = committed.get(tp.partition, OFFSET_INVALID)
            result[tp.partition] = (low, high, offset if offset >= 0 else -1)
        return result
    finally:
        consumer.close()
