"""Each console user's own choices: the time zone the console shows times in.

Times are stored in UTC and the console shows UTC until a user picks a zone. The chosen
zone applies to the console's pages and CSV export, where every time says its zone. The
REST API answers in UTC whoever calls it (ISO 8601 with its offset), so a script reads the
same text whichever user's token or session it runs under.
"""

import zoneinfo
from functools import cache

from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views import View

from .console import ConsoleMixin
from .models import ConsolePreference

API_PREFIX = "/api/"


@cache
def zone_choices() -> list[tuple[str, str]]:
    """UTC first, then every zone this Python knows, by name."""
    names = sorted(zoneinfo.available_timezones() - {"UTC"})
    return [("UTC", "UTC")] + [(name, name.replace("_", " ")) for name in names]


def user_time_zone(user) -> str:
    """The zone `user` chose, or UTC."""
    if not user.is_authenticated:
        return "UTC"
    chosen = ConsolePreference.objects.filter(user_id=user.pk).values_list(
        "time_zone", flat=True
    ).first()
    return chosen or "UTC"


class UserTimeZoneMiddleware:
    """Activate the logged-in user's zone for the console; the API stays in UTC."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        zone = "UTC"
        if not request.path_info.startswith(API_PREFIX):
            zone = user_time_zone(request.user)
        try:
            timezone.activate(zoneinfo.ZoneInfo(zone))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            # A zone this Python no longer knows (tzdata changed): UTC rather than a 500.
            timezone.activate(zoneinfo.ZoneInfo("UTC"))
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()


class PreferenceForm(forms.ModelForm):
    time_zone = forms.TypedChoiceField(
        label="Time zone",
        choices=zone_choices,
        help_text="The console's tables, pages and CSV export show times in this zone. "
        "Usage windows still close on the hours of UTC; the API answers in UTC.",
    )

    class Meta:
        model = ConsolePreference
        fields = ["time_zone"]


class PreferenceView(ConsoleMixin, View):
    """The logged-in user's preferences: one form, saved for that user only."""

    def get(self, request):
        return self.page(request, PreferenceForm(instance=self.preference(request)))

    def post(self, request):
        form = PreferenceForm(request.POST, instance=self.preference(request))
        if not form.is_valid():
            return self.page(request, form, status=400)
        form.save()
        messages.success(request, f"Times are now shown in {form.instance.time_zone}.")
        return redirect("console:preferences")

    def preference(self, request) -> ConsolePreference:
        return ConsolePreference.objects.filter(user=request.user).first() or ConsolePreference(
            user=request.user
        )

    def page(self, request, form, *, status=200):
        return render(request, "reprocess/preferences.html",
                      {"form": form, "section": "usage", "nav": "preferences",
                       "now": timezone.now()}, status=status)
