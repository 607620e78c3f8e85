"""django-tables2 tables of the operator console."""

import json

import django_tables2 as tables
from django.urls import reverse
from django.utils.html import format_html

from usage_sync.models import AggregatedBatch, SyncActivity, UsageRecord

# Every time says its zone: UTC, or the one the user chose under Preferences.
TIME = "Y-m-d H:i T"
TIME_SECONDS = "Y-m-d H:i:s T"


class StatusColumn(tables.Column):
    """Render a status as a colour badge."""

    def render(self, value, record, bound_column):
        # The stored value (ERROR, IN_PROCESS), not the choice's display label.
        raw = bound_column.accessor.resolve(record)
        return format_html('<span class="badge badge-{}">{}</span>', raw.lower(), raw)


class BatchTable(tables.Table):
    """The incomplete-batch view: one row per batch, counts from its counters."""

    expand = tables.TemplateColumn(
        template_name="reprocess/partials/batch_expand_cell.html",
        verbose_name="", orderable=False, attrs={"td": {"class": "col-icon"}},
    )
    id = tables.Column(linkify=("console:batch", [tables.A("pk")]), verbose_name="ID")
    window_start = tables.DateTimeColumn(verbose_name="Start date/time", format=TIME)
    window_end = tables.DateTimeColumn(verbose_name="End date/time", format=TIME)
    total_count = tables.Column(verbose_name="Total", attrs={"td": {"class": "num"}})
    completed_count = tables.Column(verbose_name="Completed", attrs={"td": {"class": "num"}})
    error_count = tables.Column(verbose_name="Error", attrs={"td": {"class": "num"}})
    pending_count = tables.Column(verbose_name="Pending", attrs={"td": {"class": "num"}})
    status = StatusColumn(verbose_name="Status")
    actions = tables.TemplateColumn(
        template_name="reprocess/partials/batch_actions_cell.html",
        verbose_name="", orderable=False, attrs={"td": {"class": "col-actions"}},
    )

    class Meta:
        model = AggregatedBatch
        fields = ["expand", "id", "window_start", "window_end", "total_count",
                  "completed_count", "error_count", "pending_count", "status", "actions"]
        order_by = "-window_start"
        attrs = {"class": "table", "id": "batch-table"}
        row_attrs = {"data-batch-id": lambda record: record.pk}
        empty_text = "No incomplete batches: everything has been synced."
        # The rows, field by field: per-cell rendering was most of the page's time.
        template_name = "reprocess/tables/batch_table.html"


class RecordTable(tables.Table):
    """Billing Aggregated Usage Records."""

    status = StatusColumn()
    batch = tables.Column(accessor="batch_id", verbose_name="Batch",
                          linkify=("console:batch", [tables.A("batch_id")]))
    client_record_id = tables.Column(linkify=("console:record", [tables.A("pk")]),
                                     empty_values=())
    usage_date = tables.DateTimeColumn(format=TIME)
    sync_error_message = tables.Column(attrs={"td": {"class": "wrap"}})

    class Meta:
        model = UsageRecord
        # Status and error first: what an operator reviews; the usage details after.
        fields = ["id", "batch", "client_record_id", "client_acct_id", "status",
                  "sync_error_code", "sync_error_message", "usage_type_code", "usage_units",
                  "usage_date", "event_count", "acct_no", "attempts"]
        attrs = {"class": "table"}
        empty_text = "No records match these filters."
        # The rows, field by field: per-cell rendering was most of the page's time.
        template_name = "reprocess/tables/record_table.html"

    def render_client_record_id(self, value, record):
        # An OPEN record has its id once its window closes.
        return value or f"open #{record.pk}"


class ActivityTable(tables.Table):
    """The activity log, with a details toggle per entry (error and what was sent)."""

    status = StatusColumn()
    created_at = tables.DateTimeColumn(format=TIME_SECONDS, verbose_name="Date")
    duration_ms = tables.Column(verbose_name="Duration", attrs={"td": {"class": "num"}})
    record_count = tables.Column(verbose_name="Records", attrs={"td": {"class": "num"}})
    details = tables.Column(orderable=False, empty_values=())

    class Meta:
        model = SyncActivity
        fields = ["id", "created_at", "status", "action_name", "object_name", "actor",
                  "record_count", "duration_ms", "details"]
        order_by = "-id"
        attrs = {"class": "table"}
        empty_text = "No activity matches these filters."

    def render_duration_ms(self, value):
        return f"{value} ms"

    def render_details(self, value, record):
        if not value and not record.error_code:
            return "—"
        error = ""
        if record.error_code or record.error_message:
            error = f"{record.error_code} {record.error_message}".strip()
        return format_html(
            '<details><summary>{}</summary><pre class="details">{}{}</pre></details>',
            f"Show · {record.error_code}" if record.error_code else "Show",
            f"error: {error}\n\n" if error else "",
            json.dumps(value, indent=2, sort_keys=True),
        )


class AccountTable(tables.Table):
    """Accounts seen in usage, with their record counts by status."""

    client_acct_id = tables.Column(verbose_name="Client account id")
    acct_no = tables.Column(verbose_name="Account no")
    total = tables.Column(attrs={"td": {"class": "num"}})
    complete = tables.Column(attrs={"td": {"class": "num"}})
    error = tables.Column(attrs={"td": {"class": "num"}})
    pending = tables.Column(attrs={"td": {"class": "num"}})
    ignored = tables.Column(attrs={"td": {"class": "num"}})
    last_usage = tables.DateTimeColumn(format=TIME, verbose_name="Last usage")
    records = tables.Column(empty_values=(), orderable=False, verbose_name="")

    class Meta:
        attrs = {"class": "table"}
        order_by = "client_acct_id"
        empty_text = "No accounts have usage yet."

    def render_records(self, record):
        account = record["client_acct_id"] or record["acct_no"]
        return format_html(
            '<a href="{}?account={}">View records</a>', reverse("console:records"), account
        )
