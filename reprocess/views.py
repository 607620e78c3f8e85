"""Operator console: server-rendered pages over filters.py, tables.py and reprocess.py."""

import csv
from datetime import datetime

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.mixins import PermissionRequiredMixin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count, Max, Q, Sum
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views import View
from django.views.generic import TemplateView
from django.views.generic.edit import FormView
from django_filters.views import FilterView
from django_tables2 import SingleTableMixin, SingleTableView

from usage_sync.models import (
    AggregatedBatch,
    AggregationConfig,
    BatchStatus,
    RecordStatus,
    SyncActivity,
    UsageRecord,
)

from .charts import sync_outcome_chart
from .console import REPROCESS_PERM, BoundedLazyPaginator, ConsoleMixin, summary_lines
from .filters import ActivityFilter, BatchFilter, RecordFilter, day_range
from .models import ReprocessRun
from .reprocess import ReprocessError, reprocess_run_create
from .tables import AccountTable, ActivityTable, BatchTable, RecordTable

# --- overview ----------------------------------------------------------------------------

class OverviewView(ConsoleMixin, TemplateView):
    """Batches and records by status, and the last two weeks of sync outcomes."""

    template_name = "reprocess/overview.html"
    nav = "overview"

    def get_context_data(self, **kwargs):
        batches = dict(
            AggregatedBatch.objects.order_by().values_list("status").annotate(n=Count("id"))
        )
        # Record counts from the batches' maintained counters: no scan of the records.
        records = AggregatedBatch.objects.aggregate(
            total=Sum("total_count"), complete=Sum("completed_count"),
            error=Sum("error_count"), pending=Sum("pending_count"),
            ignored=Sum("ignored_count"),
        )
        return super().get_context_data(
            batch_counts=[(s.value, batches.get(s.value, 0)) for s in BatchStatus],
            record_counts={k: v or 0 for k, v in records.items()},
            incomplete_batches=AggregatedBatch.objects.incomplete().count(),
            chart=sync_outcome_chart(),
            **kwargs,
        )


# --- incomplete batches and their summary -------------------------------------------------


class IncompleteBatchFilter(BatchFilter):
    """The seed's three filters; the view itself selects the incomplete batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Sorting is the table's (?sort=); incompleteness is the view's.
        del self.filters["incomplete"]
        del self.filters["ordering"]


class BatchListView(ConsoleMixin, SingleTableMixin, FilterView):
    """Billing Sync Reprocess ▸ Aggregated usage: incomplete batches, latest first."""

    template_name = "reprocess/batch_list.html"
    table_class = BatchTable
    filterset_class = IncompleteBatchFilter
    # The table paginates; a paginate_by would make ListView fetch the page a second time.
    table_pagination = {"per_page": 25}
    nav = "batches"
    # Served by batch_incomplete_idx.
    queryset = AggregatedBatch.objects.incomplete()

    def get_context_data(self, **kwargs):
        run = None
        run_id = self.request.GET.get("run", "")
        if run_id.isdecimal():  # not isdigit: "²" is a digit int() refuses
            run = ReprocessRun.objects.filter(pk=run_id).first()
        return super().get_context_data(run=run, **kwargs)


class ErrorSummaryView(ConsoleMixin, View):
    """A batch's incomplete records by status and error code, as the row the console's
    script expands under the batch (?fragment=1); otherwise the batch's page, which shows
    the same summary (the batch row's expand icon links there)."""

    def get(self, request, batch_id: int):
        batch = get_object_or_404(AggregatedBatch, pk=batch_id)
        if not request.GET.get("fragment"):
            return redirect(reverse("console:batch", args=[batch.pk]) + "#summary")
        return render(request, "reprocess/partials/error_summary.html",
                      {"batch": batch, "lines": summary_lines(batch)})


# --- reprocess ---------------------------------------------------------------------------


class ReprocessView(ConsoleMixin, PermissionRequiredMixin, View):
    """Confirm a reprocess with its dry-run counts (GET), then queue it (POST)."""

    # Logged in without the permission: 403 (AccessMixin); anonymous: the login page.
    permission_required = REPROCESS_PERM

    def scope(self, data) -> dict:
        batch = data.get("batch", "")
        return {
            "level": data.get("level", ""),
            "batch_id": int(batch) if batch.isdecimal() else None,
            "error_code": data.get("error_code", ""),
            "status": data.get("status", ""),
        }

    def get(self, request):
        scope = self.scope(request.GET)
        context = {"section": "usage", "nav": "batches", "scope": scope, "dry_run": None,
                   "error": None, "inline_records": settings.REPROCESS_INLINE_RECORDS}
        try:
            context["dry_run"] = reprocess_run_create(
                **scope, actor=request.user.get_username(), dry_run=True
            )
        except ReprocessError as exc:
            context["error"] = exc.message
        return render(request, "reprocess/reprocess_confirm.html", context,
                      status=200 if context["error"] is None else 400)

    def post(self, request):
        scope = self.scope(request.POST)
        reason = request.POST.get("reason", "").strip()[:1000]
        try:
            run = reprocess_run_create(**scope, actor=request.user.get_username(), reason=reason)
        except ReprocessError as exc:
            messages.error(request, f"Reprocess not started: {exc.message}")
            return redirect("console:batches")
        messages.success(
            request,
            f"Reprocess run {run.pk} ({run.object_name}) queued {run.records_selected} "
            f"records in {run.batches_selected} batches." if run.is_queued else
            f"Reprocess run {run.pk} ({run.object_name}) is queueing up to "
            f"{run.records_expected} records in {run.batches_expected} batches in the "
            "background.",
        )
        return redirect(reverse("console:batches") + f"?run={run.pk}")


class RunProgressView(ConsoleMixin, View):
    """A run's records by current status, polled by the batch view until it is done."""

    def get(self, request, run_id: int):
        run = get_object_or_404(ReprocessRun, pk=run_id)
        progress = run.progress()
        run.mark_finished(progress)
        return render(request, "reprocess/partials/run_progress.html",
                      {"run": run, "progress": progress})


# --- records -----------------------------------------------------------------------------


class ConsoleRecordFilter(RecordFilter):
    """The records FilterSet plus the usage date range the console offers."""

    start_date, end_date = day_range("usage_date", "Records whose window starts")
    start_date.label, end_date.label = "Usage from", "Usage before"


class RecordListView(ConsoleMixin, SingleTableMixin, FilterView):
    """Billing Aggregated Usage Records: filtered, sorted, lazily paginated (no COUNT(*))."""

    template_name = "reprocess/record_list.html"
    table_class = RecordTable
    filterset_class = ConsoleRecordFilter
    table_pagination = {"per_page": 50, "paginator_class": BoundedLazyPaginator}
    queryset = UsageRecord.objects.all()
    nav = "records"

    def get_context_data(self, **kwargs):
        export = reverse("console:records-csv") + "?" + self.request.GET.urlencode()
        return super().get_context_data(export_url=export, **kwargs)


class _Echo:
    def write(self, value):
        return value


CSV_FIELDS = ["id", "batch_id", "client_record_id", "client_acct_id", "acct_no",
              "usage_type_code", "usage_type", "qualifier_1", "qualifier_2", "qualifier_3",
              "qualifier_4", "usage_units", "amount", "rate", "usage_date", "event_count",
              "status", "sync_error_code", "sync_error_message", "attempts", "completed_at"]


def _csv_value(value, zone):
    """Times as ISO 8601 with the offset of the user's zone, like the pages show them."""
    if isinstance(value, datetime):
        return timezone.localtime(value, zone).isoformat()
    return value


class RecordCsvView(ConsoleMixin, View):
    """Stream the filtered records as CSV, a chunk of rows at a time."""

    def get(self, request):
        filterset = ConsoleRecordFilter(request.GET, queryset=UsageRecord.objects.all())
        if not filterset.is_valid():
            return render(request, "reprocess/record_list.html",
                          {"filter": filterset, "section": "usage", "nav": "records"},
                          status=400)
        rows = filterset.qs.order_by("id").values_list(*CSV_FIELDS).iterator(chunk_size=2000)
        writer = csv.writer(_Echo())
        # The rows stream after the view returns, when the request's zone is deactivated.
        zone = timezone.get_current_timezone()

        def lines():
            yield writer.writerow(CSV_FIELDS)
            for row in rows:
                yield writer.writerow([_csv_value(value, zone) for value in row])

        response = StreamingHttpResponse(lines(), content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="aggregated-usage-records.csv"'
        return response


# --- activity log ------------------------------------------------------------------------


class ActivityFilterForConsole(ActivityFilter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.filters["ordering"]  # the table sorts (?sort=)


class ActivityListView(ConsoleMixin, SingleTableMixin, FilterView):
    """The activity log: sync calls, aggregation runs, reprocesses, config changes."""

    template_name = "reprocess/activity_list.html"
    table_class = ActivityTable
    filterset_class = ActivityFilterForConsole
    table_pagination = {"per_page": 50, "paginator_class": BoundedLazyPaginator}
    queryset = SyncActivity.objects.all()
    nav = "activity"


# --- configuration -----------------------------------------------------------------------


class AggregationConfigForm(forms.ModelForm):
    class Meta:
        model = AggregationConfig
        fields = ["frequency_minutes", "group_by_qualifier_1", "group_by_qualifier_2",
                  "group_by_qualifier_3", "group_by_qualifier_4", "batch_size",
                  "lateness_grace_minutes", "enabled"]
        labels = {"frequency_minutes": "Aggregation frequency",
                  "lateness_grace_minutes": "Lateness grace (minutes)"}


class ConfigView(ConsoleMixin, FormView):
    """Aggregate usage configuration; saving needs usage_sync.change_aggregationconfig."""

    template_name = "reprocess/config.html"
    form_class = AggregationConfigForm
    nav = "config"
    permission = "usage_sync.change_aggregationconfig"

    def can_change(self) -> bool:
        return self.request.user.has_perm(self.permission)

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        kwargs["instance"] = AggregationConfig.load()
        return kwargs

    def get_form(self, form_class=None):
        form = super().get_form(form_class)
        if not self.can_change():
            for field in form.fields.values():
                field.disabled = True
        return form

    def get_context_data(self, **kwargs):
        config = AggregationConfig.load()
        before = config.previous_rule or {}
        minutes = before.get("frequency_minutes")
        previous_rule_text = "{} by account and usage type{}".format(
            dict(AggregationConfig.Frequency.choices).get(minutes, f"every {minutes} minutes")
            .lower(),
            "".join(f", qualifier {n}" for n in before.get("qualifiers", [])),
        )
        return super().get_context_data(
            can_change=self.can_change(), config=config, now=timezone.now(),
            previous_rule_text=previous_rule_text, **kwargs,
        )

    def post(self, request, *args, **kwargs):
        if not self.can_change():
            raise PermissionDenied("Changing the configuration needs change_aggregationconfig.")
        return super().post(request, *args, **kwargs)

    def form_valid(self, form):
        changes = {
            name: {"old": _plain(form.initial.get(name)), "new": _plain(form.cleaned_data[name])}
            for name in form.changed_data
        }
        with transaction.atomic():
            now = timezone.now()
            stored = AggregationConfig.objects.select_for_update().get(pk=1)
            config = form.save(commit=False)
            config.edited(in_force=stored.rule_at(now), now=now)
            config.updated_at = now
            config.save()
            details = {"changes": changes}
            if config.rule_changes_at and config.rule_changes_at > now:
                details["rule_applies_from"] = config.rule_changes_at.isoformat()
            if changes:
                SyncActivity.objects.create(
                    action_name=SyncActivity.Action.CONFIG_CHANGE,
                    object_name="Aggregate usage configuration",
                    status=SyncActivity.Status.COMPLETE,
                    actor=self.request.user.get_username(),
                    details=details,
                )
        if changes:
            when = ""
            if "rule_applies_from" in details:
                when = (" The frequency and grouping apply from the next window on, at "
                        f"{timezone.localtime(config.rule_changes_at):%Y-%m-%d %H:%M %Z}.")
            messages.success(self.request, f"Configuration saved: {', '.join(changes)}.{when}")
        else:
            messages.info(self.request, "Nothing changed.")
        return redirect("console:config")


def _plain(value):
    """Return a value the activity log's JSON can hold (the form's fields are all plain)."""
    return value if isinstance(value, bool | int | str | None) else str(value)


# --- accounts ----------------------------------------------------------------------------


class AccountListView(ConsoleMixin, SingleTableView):
    """Accounts seen in usage with their record counts by status (one GROUP BY)."""

    template_name = "reprocess/account_list.html"
    table_class = AccountTable
    table_pagination = {"per_page": 50}
    section = "account"
    nav = "accounts"

    def get_queryset(self):
        records = UsageRecord.objects.order_by()
        # PostgreSQL text holds no NUL: a "%00" in the search is dropped, not a 500.
        query = self.request.GET.get("q", "").replace("\x00", "").strip()
        if query:
            match = Q(client_acct_id__icontains=query)
            # isdecimal, not isdigit: int() refuses "²"; an acct_no has at most 19 digits.
            if query.isdecimal() and len(query) <= 19:
                match |= Q(acct_no=int(query))
            records = records.filter(match)
        return records.values("client_acct_id", "acct_no").annotate(
            total=Count("id"),
            complete=Count("id", filter=Q(status=RecordStatus.COMPLETE)),
            error=Count("id", filter=Q(status__in=[RecordStatus.ERROR, RecordStatus.INCOMPLETE])),
            pending=Count("id", filter=Q(status=RecordStatus.PENDING)),
            ignored=Count("id", filter=Q(status=RecordStatus.IGNORED)),
            last_usage=Max("usage_date"),
        ).order_by("client_acct_id", "acct_no")

    def get_context_data(self, **kwargs):
        return super().get_context_data(query=self.request.GET.get("q", ""), **kwargs)
