from django.urls import path

from . import api, trail_api

urlpatterns = [
    path("batches/", api.BatchListApi.as_view(), name="batch-list"),
    path("batches/<int:batch_id>/", api.BatchDetailApi.as_view(), name="batch-detail"),
    path("batches/<int:batch_id>/error-summary/", api.ErrorSummaryApi.as_view(),
         name="batch-error-summary"),
    path("batches/<int:batch_id>/reprocess/", api.BatchReprocessApi.as_view(),
         name="batch-reprocess"),
    path("batches/<int:batch_id>/error-summary/reprocess/",
         api.ErrorSummaryReprocessApi.as_view(), name="batch-error-summary-reprocess"),
    path("records/", api.RecordListApi.as_view(), name="record-list"),
    path("records/<int:record_id>/trail/", trail_api.RecordTrailApi.as_view(),
         name="record-trail"),
    path("events/", trail_api.EventTrailApi.as_view(), name="event-trail"),
    path("trace/", trail_api.TraceApi.as_view(), name="trace"),
    path("activity/", api.ActivityListApi.as_view(), name="activity-list"),
    path("reprocess/all/", api.ReprocessAllApi.as_view(), name="reprocess-all"),
    path("reprocess/<int:run_id>/", api.ReprocessRunDetailApi.as_view(), name="reprocess-run"),
]
