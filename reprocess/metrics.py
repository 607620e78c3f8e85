"""Reprocess's own metrics: runs started (a counter), runs recorded (read at scrape time)."""

from django.db.models import Count, Sum
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

# First: with PROMETHEUS_MULTIPROC_DIR set, it makes every instrument created after it
# write to the shared directory, this module's included.
import usage_sync.metrics  # noqa: F401, I001

from .models import ReprocessLevel, ReprocessRun

REPROCESS_RUNS = Counter(
    "allegro_reprocess_runs_total",
    "Reprocess runs started, by level (all, batch, error).",
    ["level"],
)


def database_families() -> list:
    """Reprocess runs by level, read from the database: one row per operator request."""
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
    return [runs, queued]
