"""Prometheus instruments the sync pipeline updates as it works.

Counters and histograms live here and are updated where the work happens (the core Aria
client, sync, ingest). Values read from the database or the broker at scrape time
(records by status, incomplete batches, consumer lag) are collected by the /metrics view
instead (allegro/metrics.py, from usage_sync/exporter.py), so they are right whichever
process asks.

With PROMETHEUS_MULTIPROC_DIR set (production, `make run`), prometheus_client writes each
process's values to files there and /metrics sums them: web, worker and beat processes
report as one service. The directory must be emptied when the service starts (a new
deployment), and must not be shared by two services: `make run` uses a fresh
var/prometheus; gunicorn (allegro/gunicorn_conf.py) and Celery (allegro/celery.py) mark
exited processes dead.
"""

import os
import socket

from prometheus_client import Counter, Histogram, multiprocess, values

# Each process writes files named after its identifier. With the directory shared by
# containers (docker-compose's web and worker), pids repeat across them (each container
# counts from 1): the host name, the container's id there, keeps two processes off one file.
_HOST = socket.gethostname().replace("_", "-") or "localhost"


def process_identifier(pid: int | None = None) -> str:
    """Name this process (or `pid` on this host) as the multiprocess files do."""
    return f"{_HOST}-{pid or os.getpid()}"


if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Before any instrument below is created: each creates its values with this class.
    values.ValueClass = values.MultiProcessValue(process_identifier)


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges of a process of this host that exited (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(process_identifier(pid))


# Bulk calls take from milliseconds (small batch, near Aria) to the client timeout.
CALL_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

ARIA_CALL_SECONDS = Histogram(
    "allegro_aria_call_seconds",
    "Duration of calls to core Aria, by API method.",
    ["rest_call"],
    buckets=CALL_SECONDS_BUCKETS,
)
ARIA_CALLS = Counter(
    "allegro_aria_calls_total",
    "Calls to core Aria by API method and outcome: Aria's error_code, or 'transport'.",
    ["rest_call", "error_code"],
)
RECORD_OUTCOMES = Counter(
    "allegro_record_outcomes_total",
    "Records whose sync outcome was stored, by status and Aria's record error code.",
    ["status", "error_code"],
)
EVENTS_INGESTED = Counter(
    "allegro_events_ingested_total",
    "Raw usage events accepted by ingest (duplicates are counted separately).",
)
EVENTS_DUPLICATE = Counter(
    "allegro_events_duplicate_total",
    "Raw usage events refused at ingest because their event_id was already stored.",
)
PUBLISH_TO_CLAIM = Histogram(
    "allegro_batch_publish_to_claim_seconds",
    "Time from a batch id's last publish to a sync worker claiming the batch.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)


def observe_call(rest_call: str, seconds: float, error_code: str) -> None:
    """Record one call to core Aria: its duration and outcome."""
    ARIA_CALL_SECONDS.labels(rest_call).observe(seconds)
    ARIA_CALLS.labels(rest_call, error_code).inc()
