"""FilterSets shared by the console views and the REST API."""

from datetime import datetime, time

import django_filters
from django.db.models import Q
from django.utils import timezone

from usage_sync.models import (
    INCOMPLETE,
    AggregatedBatch,
    BatchStatus,
    RecordStatus,
    SyncActivity,
    UsageRecord,
)


def start_of_day(day) -> datetime:
    """Return 00:00:00 of `day` in the current time zone, as an aware datetime."""
    return datetime.combine(day, time.min, tzinfo=timezone.get_current_timezone())


def day_range(field: str, noun: str) -> tuple[django_filters.DateFilter, django_filters.DateFilter]:
    """Return Start/End Date filters on `field`: on or after the start day 00:00:00, before
    the end day 00:00:00 (the seed's filter semantics)."""

    def on_or_after(queryset, name, value):
        return queryset.filter(**{f"{field}__gte": start_of_day(value)})

    def before(queryset, name, value):
        return queryset.filter(**{f"{field}__lt": start_of_day(value)})

    return (
        django_filters.DateFilter(
            method=on_or_after, label="Start date",
            help_text=f"{noun} on or after this date, 00:00:00.",
        ),
        django_filters.DateFilter(
            method=before, label="End date", help_text=f"{noun} before this date, 00:00:00.",
        ),
    )


class StableOrderingFilter(django_filters.OrderingFilter):
    """Sort by the chosen columns, then by id, so rows with equal values never move
    between pages; an empty choice keeps the view's default order."""

    def filter(self, qs, value):
        ordered = super().filter(qs, value)
        fields = list(ordered.query.order_by)
        if not fields:
            return qs
        if not {"id", "-id", "pk", "-pk"} & set(fields):
            ordered = ordered.order_by(*fields, "id")
        return ordered


class BatchFilter(django_filters.FilterSet):
    """Incomplete-batch view: Start Date, End Date, Sync Status."""

    start_date, end_date = day_range("window_start", "Batches whose window starts")
    status = django_filters.ChoiceFilter(choices=BatchStatus.choices, label="Sync status")
    incomplete = django_filters.BooleanFilter(
        method="filter_incomplete", label="Incomplete",
        help_text="true: batches with PENDING or ERROR records; false: the others.",
    )
    ordering = StableOrderingFilter(
        fields=["window_start", "id", "total_count", "error_count", "pending_count",
                "completed_count"],
    )

    class Meta:
        model = AggregatedBatch
        fields = ["start_date", "end_date", "status", "incomplete"]

    def filter_incomplete(self, queryset, name, value):
        # The condition of batch_incomplete_idx, so the index serves it.
        return queryset.filter(INCOMPLETE if value else ~INCOMPLETE)


class RecordFilter(django_filters.FilterSet):
    """Billing Aggregated Usage Records: batch, error code, status, account."""

    batch = django_filters.NumberFilter(field_name="batch_id", label="Batch")
    error_code = django_filters.CharFilter(field_name="sync_error_code", label="Sync error code")
    status = django_filters.ChoiceFilter(choices=RecordStatus.choices, label="Status")
    account = django_filters.CharFilter(
        method="filter_account", label="Account", help_text="client_acct_id or acct_no."
    )

    class Meta:
        model = UsageRecord
        fields = ["batch", "error_code", "status", "account"]

    def filter_account(self, queryset, name, value):
        value = value.strip()
        match = Q(client_acct_id=value)
        # isdecimal, not isdigit: int() refuses "²"; an acct_no has at most 19 digits.
        if value.isdecimal() and len(value) <= 19:
            match |= Q(acct_no=int(value))
        return queryset.filter(match)


class ActivityFilter(django_filters.FilterSet):
    """Activity log: status and date filters, sortable by Id, Status, Action, Object."""

    status = django_filters.ChoiceFilter(choices=SyncActivity.Status.choices, label="Status")
    start_date, end_date = day_range("created_at", "Entries created")
    ordering = StableOrderingFilter(
        fields=["id", "status", "action_name", "object_name"],
    )

    class Meta:
        model = SyncActivity
        fields = ["status", "start_date", "end_date"]
