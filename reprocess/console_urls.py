"""Operator console URLs, served at the site root."""

from django.urls import path

from . import preferences, tokens, trail_views, views

app_name = "console"

urlpatterns = [
    path("", views.OverviewView.as_view(), name="overview"),
    path("usage/aggregated/", views.BatchListView.as_view(), name="batches"),
    path("usage/aggregated/<int:batch_id>/summary/", views.ErrorSummaryView.as_view(),
         name="batch-summary"),
    path("usage/reprocess/", views.ReprocessView.as_view(), name="reprocess"),
    path("usage/reprocess/runs/<int:run_id>/progress/", views.RunProgressView.as_view(),
         name="run-progress"),
    path("search/", trail_views.SearchView.as_view(), name="search"),
    path("usage/batches/<int:batch_id>/", trail_views.BatchDetailView.as_view(), name="batch"),
    path("usage/records/<int:record_id>/", trail_views.RecordDetailView.as_view(),
         name="record"),
    path("usage/events/", trail_views.EventDetailView.as_view(), name="event"),
    path("usage/records/", views.RecordListView.as_view(), name="records"),
    path("usage/records.csv", views.RecordCsvView.as_view(), name="records-csv"),
    path("usage/activity/", views.ActivityListView.as_view(), name="activity"),
    path("usage/configuration/", views.ConfigView.as_view(), name="config"),
    path("accounts/", views.AccountListView.as_view(), name="accounts"),
    path("preferences/", preferences.PreferenceView.as_view(), name="preferences"),
    path("tokens/", tokens.TokenView.as_view(), name="tokens"),
    path("tokens/create/", tokens.TokenCreateView.as_view(), name="tokens-create"),
    path("tokens/revoke/", tokens.TokenRevokeView.as_view(), name="tokens-revoke"),
]
