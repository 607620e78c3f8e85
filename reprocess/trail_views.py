"""The usage trail in the console: the search box, and the record, event and batch pages."""

from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views import View

from usage_sync.models import AggregatedBatch, UsageEvent, UsageRecord

from . import trail
from .console import REPROCESS_PERM, ConsoleMixin, summary_lines

EVENTS_PER_PAGE = 50
RECORDS_PER_PAGE = 50


class SearchView(ConsoleMixin, View):
    """The top bar's search: land on what the query names, or list the candidates."""

    def get(self, request):
        query = request.GET.get("q", "")
        matches = trail.find(query)
        if len(matches) == 1:
            return redirect(matches[0].url)
        return render(request, "reprocess/trail_search.html",
                      {"query": query, "matches": matches, "section": "usage"},
                      status=200 if matches or not query else 404)


class RecordDetailView(ConsoleMixin, View):
    """A record: its fields, its history (calls, reprocess runs) and its raw events."""

    def get(self, request, record_id: int):
        record = get_object_or_404(UsageRecord.objects.select_related("batch"), pk=record_id)
        events = Paginator(
            UsageEvent.objects.filter(record=record).order_by("usage_date", "id"),
            EVENTS_PER_PAGE,
        ).get_page(request.GET.get("page"))
        sums = trail.event_sums(record)
        return render(request, "reprocess/trail_record.html", {
            "record": record, "history": trail.record_history(record), "events": events,
            "sums": sums, "sums_agree": sums.agree_with(record), "section": "usage",
            "nav": "records",
        })


class EventDetailView(ConsoleMixin, View):
    """An event by its event_id: when it came, where it went, and that record's status."""

    def get(self, request):
        event_id = request.GET.get("id", "")
        if len(event_id) > trail.MAX_QUERY_LENGTH or "\x00" in event_id:
            raise Http404("No such event.")
        event = get_object_or_404(
            UsageEvent.objects.select_related("record__batch"), event_id=event_id
        )
        return render(request, "reprocess/trail_event.html", {
            "event": event,
            "closes_at": (
                None if event.record and event.record.batch_id
                else trail.window_closes_at(event)
            ),
            "now": timezone.now(), "section": "usage", "nav": "records",
        })


class BatchDetailView(ConsoleMixin, View):
    """A batch: its counts, the timeline of its calls and reprocesses, its error summary
    and its records."""

    def get(self, request, batch_id: int):
        batch = get_object_or_404(AggregatedBatch, pk=batch_id)
        records = Paginator(
            UsageRecord.objects.filter(batch=batch).order_by("id"), RECORDS_PER_PAGE
        ).get_page(request.GET.get("page"))
        lines = summary_lines(batch)
        return render(request, "reprocess/trail_batch.html", {
            "batch": batch, "timeline": trail.batch_timeline(batch), "lines": lines,
            "records": records, "can_reprocess": request.user.has_perm(REPROCESS_PERM),
            "section": "usage", "nav": "batches",
        })
