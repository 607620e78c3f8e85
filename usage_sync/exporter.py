"""What /metrics serves: the pipeline's counters plus values read at scrape time.

Counters and histograms (usage_sync/metrics.py) are updated where the work happens. With
PROMETHEUS_MULTIPROC_DIR set, every process (web, worker pool children, beat) writes
them to files in that directory and this view sums the files, so one scrape of any web
process reports the whole service. Without it (a single process) they come from this
process's default registry.

Values that live elsewhere are read when Prometheus asks, so any process answers the
same and nothing goes stale:
- the database, by a few aggregate queries (database_families states their cost);
- the broker: the sync consumer group's committed offset against the high watermark of
  each partition of the batch-id topic.
A source that cannot be read gives `allegro_collector_up{collector="kafka"} 0` (or
"database"), never a failed scrape.
"""

from __future__ import annotations

import hmac
import logging
import os
import time

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Count, Min, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from reprocess.models import ReprocessLevel, ReprocessRun

from .models import AggregatedBatch, BatchStatus, RecordStatus, UsageEvent

logger = logging.getLogger(__name__)


def database_families() -> list:
    """Counts read from the database at scrape time, in three cheap queries.

    Cost (the database may hold millions of records):
    1. One pass over the batch table (not the record table): records by status are the
       sums of each batch's maintained counters, which the sync and reprocess update in
       the same transaction as the records. There are batch-size times fewer batches
       than records (1,000 batches for 1M records at the default batch size). The same
       pass counts batches by status, the incomplete ones, and the oldest with PENDING
       records.
    2. Unaggregated events: COUNT over the partial index `event_unaggregated_idx`, which
       holds only events not yet aggregated (few, between two aggregation runs). Stored
       events: PostgreSQL's own row estimate (pg_class.reltuples, kept fresh by
       autovacuum), not a COUNT(*) over millions of rows.
    3. Reprocess runs by level: one row per operator request, a small table.
    """
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
            incomplete=Count("id", filter=Q(pending_count__gt=0) | Q(error_count__gt=0)),
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

    unaggregated = GaugeMetricFamily(
        "allegro_usage_events_unaggregated",
        "Raw usage events not yet aggregated into a record.",
    )
    unaggregated.add_metric([], UsageEvent.objects.filter(record__isnull=True).count())
    stored = GaugeMetricFamily(
        "allegro_usage_events_stored",
        "Raw usage events stored (on PostgreSQL the planner's row estimate).",
    )
    stored.add_metric([], _stored_events())

    runs = GaugeMetricFamily(
        "allegro_reprocess_runs_recorded",
        "Reprocess runs recorded in the database, by level.",
        labels=["level"],
    )
    queued = GaugeMetricFamily(
        "allegro_reprocess_records_selected",
        "Records queued again by the recorded reprocess runs, by level.",
        labels=["level"],
    )
    counts = {
        row["level"]: row
        for row in ReprocessRun.objects.order_by()
        .values("level")
        .annotate(runs=Count("id"), records=Sum("records_selected"))
    }
    for level in ReprocessLevel.values:
        row = counts.get(level, {})
        runs.add_metric([level], row.get("runs", 0))
        queued.add_metric([level], row.get("records") or 0)
    return [records, batches, incomplete, oldest, unaggregated, stored, runs, queued]


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


class ScrapeTimeCollector:
    """Reads the database and the broker at scrape time; a source that cannot be read
    gives `allegro_collector_up{collector=…} 0` and the rest of the scrape still works."""

    def collect(self):
        up = GaugeMetricFamily(
            "allegro_collector_up",
            "1 if the scrape-time collector could read its source (database, kafka), else 0.",
            labels=["collector"],
        )
        duration = GaugeMetricFamily(
            "allegro_collector_duration_seconds",
            "Time the scrape-time collector took to read its source.",
            labels=["collector"],
        )
        sources = [
            ("database", database_families, DatabaseError),
            ("kafka", kafka_lag_families, KafkaException),
        ]
        for name, read, failure in sources:
            started = time.monotonic()
            try:
                yield from read()
            except failure as exc:
                logger.warning(
                    "metrics: %s could not be read: %s", name, exc, extra={"collector": name}
                )
                up.add_metric([name], 0)
            else:
                up.add_metric([name], 1)
            duration.add_metric([name], time.monotonic() - started)
        yield up
        yield duration


class _ThisProcess:
    """The default registry of this process (single-process mode)."""

    def collect(self):
        yield from REGISTRY.collect()


def build_registry() -> CollectorRegistry:
    """Return a registry with every metric /metrics serves, for one scrape."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(ScrapeTimeCollector())
    return registry


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the metrics in the Prometheus text format (Bearer METRICS_TOKEN if set)."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("metrics need a bearer token\n", status=401,
                                    content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return HttpResponse(generate_latest(build_registry()), content_type=CONTENT_TYPE_LATEST)
