"""The overview's chart of sync outcomes: the data (one GROUP BY) and its SVG geometry."""

from __future__ import annotations

from datetime import date, timedelta

from django.db.models import Count
from django.db.models.functions import TruncDate
from django.utils import timezone

from usage_sync.models import SyncActivity

CHART_DAYS = 14
CHART_STATUSES = [s.value for s in SyncActivity.Status]
# Geometry of the SVG, in its own units.
HEIGHT, BAR_WIDTH, GAP, TOP, LEFT = 160, 36, 12, 10, 40


def sync_outcome_chart() -> dict:
    """A stacked bar per day of the last CHART_DAYS: bulk_record_usage_m calls by outcome."""
    days = [timezone.localdate() - timedelta(days=i) for i in reversed(range(CHART_DAYS))]
    return stacked_bars(daily_call_outcomes(), days)


def daily_call_outcomes() -> dict[tuple[date, str], int]:
    """Count the sync calls of the last CHART_DAYS by (day, activity status)."""
    rows = (
        SyncActivity.objects.filter(
            action_name=SyncActivity.Action.BULK_RECORD_USAGE,
            created_at__gte=timezone.now() - timedelta(days=CHART_DAYS),
        )
        .annotate(day=TruncDate("created_at"))
        .order_by()
        .values_list("day", "status")
        .annotate(n=Count("id"))
    )
    return {(day, status): n for day, status, n in rows}


def stacked_bars(counts: dict[tuple[date, str], int], days: list[date]) -> dict:
    """Lay the counts out as one bar per day, a segment per status, scaled to the peak."""
    peak = max([sum(counts.get((d, s), 0) for s in CHART_STATUSES) for d in days] + [1])
    bars = []
    for i, day in enumerate(days):
        y = TOP + HEIGHT
        segments = []
        for status in CHART_STATUSES:
            if n := counts.get((day, status), 0):
                h = n * HEIGHT / peak
                y -= h
                segments.append({"status": status.lower(), "n": n, "y": round(y, 1),
                                 "h": round(h, 1)})
        bars.append({"x": LEFT + i * (BAR_WIDTH + GAP), "label": day.strftime("%m-%d"),
                     "segments": segments, "total": sum(s["n"] for s in segments)})
    return {"bars": bars, "peak": peak, "width": LEFT + len(days) * (BAR_WIDTH + GAP),
            "height": HEIGHT + TOP + 30, "base": TOP + HEIGHT, "bar_width": BAR_WIDTH,
            "statuses": [s.lower() for s in CHART_STATUSES], "top": TOP, "empty": not counts}
