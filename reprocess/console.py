"""What every console page shares: the login requirement, the navigation, the paginator."""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.paginator import EmptyPage
from django.urls import reverse
from django.utils.http import urlencode
from django_tables2.paginators import LazyPaginator

from usage_sync.models import AggregatedBatch

from .models import ReprocessLevel
from .reprocess import error_summary

REPROCESS_PERM = "reprocess.reprocess_usage"


class BoundedLazyPaginator(LazyPaginator):
    """LazyPaginator (no COUNT(*)), answering a page number past any real page with 404
    instead of an OFFSET too large for PostgreSQL's bigint (a 500)."""

    MAX_PAGE = 10**12

    def validate_number(self, number):
        number = super().validate_number(number)
        if number > self.MAX_PAGE:
            raise EmptyPage("That page contains no results")
        return number


def summary_lines(batch: AggregatedBatch) -> list[dict]:
    """The batch's error summary, each line with the links to its records and to
    reprocess it."""
    lines = error_summary(batch)
    for line in lines:
        group = {"batch": batch.pk, "error_code": line["error_code"], "status": line["status"]}
        line["records_url"] = reverse("console:records") + "?" + urlencode(group)
        line["reprocess_url"] = reverse("console:reprocess") + "?" + urlencode(
            {"level": ReprocessLevel.ERROR_SUMMARY, **group}
        )
    return lines


class ConsoleMixin(LoginRequiredMixin):
    """Every console page needs a login; `section` picks the navigation pane."""

    section = "usage"
    nav = ""

    def get_context_data(self, **kwargs):
        return super().get_context_data(section=self.section, nav=self.nav, **kwargs)
