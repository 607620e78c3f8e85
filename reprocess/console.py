"""What every console page shares: the login requirement, the navigation, the paginator."""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.paginator import EmptyPage
from django_tables2.paginators import LazyPaginator

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


class ConsoleMixin(LoginRequiredMixin):
    """Every console page needs a login; `section` picks the navigation pane."""

    section = "usage"
    nav = ""

    def get_context_data(self, **kwargs):
        return super().get_context_data(section=self.section, nav=self.nav, **kwargs)
