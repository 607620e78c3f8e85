"""/metrics: every app's counters plus the values read at scrape time.

Counters and histograms are updated where the work happens (usage_sync/metrics.py,
reprocess/metrics.py). With PROMETHEUS_MULTIPROC_DIR set, every process (web, worker pool
children, consumers, beat) writes them to files in that directory and this view sums the
files, so one scrape of any web process reports the whole service. Without it (a single
process) they come from this process's default registry.

Values read at scrape time come from each app's `database_families` and the broker's
consumer lag. A source that cannot be read gives `allegro_collector_up{collector="kafka"} 0`
(or "database"), never a failed scrape.
"""

from __future__ import annotations

import hmac
import logging
import os
import time

from confluent_kafka import KafkaException
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

import reprocess.metrics
from usage_sync import exporter

logger = logging.getLogger(__name__)


def database_families() -> list:
    return [*exporter.database_families(), *reprocess.metrics.database_families()]


def kafka_families() -> list:
    return exporter.kafka_lag_families()


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
            ("kafka", kafka_families, KafkaException),
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
