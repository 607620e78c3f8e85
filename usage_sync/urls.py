from django.urls import path

from . import api

urlpatterns = [
    path("usage-events/", api.UsageEventIngestApi.as_view(), name="usage-event-ingest"),
]
