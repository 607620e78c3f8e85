"""REST API of review and reprocess: small views over filters.py and reprocess.py."""

from django.utils.text import get_text_list
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination, PageNumberPagination
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from usage_sync.models import AggregatedBatch, SyncActivity, UsageRecord

from .filters import ActivityFilter, BatchFilter, RecordFilter
from .models import ReprocessLevel, ReprocessRun
from .reprocess import REPROCESSABLE, ReprocessError, error_summary, reprocess_run_create

ERROR_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409}

Detail = inline_serializer("Detail", {"detail": serializers.CharField()})
InvalidInput = inline_serializer(
    "InvalidInput", {"detail": serializers.CharField(), "errors": serializers.DictField()}
)


class CanReprocess(BasePermission):
    message = "Reprocessing needs the permission reprocess.reprocess_usage."

    def has_permission(self, request, view):
        return request.user.has_perm("reprocess.reprocess_usage")


class StrictFilterBackend(DjangoFilterBackend):
    """Answer invalid filter values with a 400 that names them in `detail`."""

    def filter_queryset(self, request, queryset, view):
        filterset = self.get_filterset(request, queryset, view)
        if filterset is None:
            return queryset
        if not filterset.is_valid():
            _invalid(filterset.errors, what="filter")
        return filterset.qs


def _invalid(errors, *, what: str):
    fields = get_text_list([f"'{name}'" for name in errors], "and")
    raise ValidationError({"detail": f"Invalid {what} value for {fields}.", "errors": errors})


def _validated(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    if not serializer.is_valid():
        _invalid(serializer.errors, what="input")
    return serializer.validated_data


class Pages(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class RecordPages(CursorPagination):
    # A cursor: no count(*) over millions of records, stable pages while they change.
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000
    ordering = "id"


# --- read side -------------------------------------------------------------------------


class BatchSerializer(serializers.ModelSerializer):
    incomplete = serializers.BooleanField(source="is_incomplete", read_only=True)

    class Meta:
        model = AggregatedBatch
        fields = ["id", "window_start", "window_end", "sequence", "status", "total_count",
                  "completed_count", "error_count", "pending_count", "ignored_count",
                  "incomplete", "published_at", "synced_at", "updated_at"]


class BatchListApi(generics.ListAPIView):
    """Batches with their counts, latest first; `incomplete=true` is the reprocess view."""

    queryset = AggregatedBatch.objects.all()
    serializer_class = BatchSerializer
    filter_backends = [StrictFilterBackend]
    filterset_class = BatchFilter
    pagination_class = Pages


class BatchDetailApi(APIView):
    """One batch with its counts."""

    @extend_schema(responses={200: BatchSerializer, 404: Detail})
    def get(self, request, batch_id: int):
        return Response(BatchSerializer(_batch(batch_id)).data)


class ErrorSummaryApi(APIView):
    """The batch's incomplete records grouped by status and error code (the expanded row)."""

    class SummaryRowSerializer(serializers.Serializer):
        error_code = serializers.CharField()
        error_message = serializers.CharField()
        status = serializers.CharField(help_text="PENDING or ERROR.")
        count = serializers.IntegerField()

    @extend_schema(responses={200: SummaryRowSerializer(many=True), 404: Detail})
    def get(self, request, batch_id: int):
        batch = _batch(batch_id)
        return Response(self.SummaryRowSerializer(error_summary(batch), many=True).data)


class RecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = UsageRecord
        fields = ["id", "batch", "client_record_id", "client_acct_id", "acct_no",
                  "usage_type_code", "usage_type", "qualifier_1", "qualifier_2", "qualifier_3",
                  "qualifier_4", "usage_units", "amount", "rate", "usage_date", "event_count",
                  "status", "sync_error_code", "sync_error_message", "attempts", "sent_at",
                  "completed_at", "updated_at"]


class RecordListApi(generics.ListAPIView):
    """Aggregated usage records, by batch, error code, status and account; cursor pages."""

    queryset = UsageRecord.objects.all()
    serializer_class = RecordSerializer
    filter_backends = [StrictFilterBackend]
    filterset_class = RecordFilter
    pagination_class = RecordPages


class ActivitySerializer(serializers.ModelSerializer):
    class Meta:
        model = SyncActivity
        fields = ["id", "action_name", "object_name", "status", "batch", "error_code",
                  "error_message", "record_count", "duration_ms", "actor", "details",
                  "created_at"]


class ActivityListApi(generics.ListAPIView):
    """The activity log (sync calls, aggregation runs, reprocesses), latest first."""

    queryset = SyncActivity.objects.all()
    serializer_class = ActivitySerializer
    filter_backends = [StrictFilterBackend]
    filterset_class = ActivityFilter
    pagination_class = Pages


# --- reprocess -------------------------------------------------------------------------


class ReprocessInputSerializer(serializers.Serializer):
    dry_run = serializers.BooleanField(
        default=False, help_text="Count what would be queued; change nothing."
    )
    reason = serializers.CharField(
        default="", allow_blank=True, max_length=1000, help_text="Why, for the activity log."
    )


class ErrorSummaryReprocessInputSerializer(ReprocessInputSerializer):
    error_code = serializers.CharField(
        default="", allow_blank=True, max_length=20,
        help_text="The summary row's sync error code (blank for PENDING rows).",
    )
    status = serializers.CharField(
        max_length=16, help_text=f"The summary row's status: one of {', '.join(REPROCESSABLE)}."
    )


class ReprocessQueuedSerializer(serializers.Serializer):
    run_id = serializers.IntegerField(allow_null=True, help_text="null for a dry run.")
    dry_run = serializers.BooleanField()
    queued = serializers.BooleanField(
        help_text="true: the records are queued, `records` and `batches` count them. false: "
                  "a dry run, or a large run queueing in the background (follow it at "
                  "/api/v1/reprocess/{run_id}/); `records` and `batches` are then the most "
                  "it will queue, from the batch counters."
    )
    records = serializers.IntegerField(help_text="Records queued (or at most, see `queued`).")
    batches = serializers.IntegerField(help_text="Batches queued (or at most, see `queued`).")


def _reprocess_schema(request):
    return extend_schema(
        request=request,
        responses={
            202: ReprocessQueuedSerializer,
            400: InvalidInput,
            403: Detail,
            404: Detail,
            409: OpenApiResponse(Detail, description="The batch is being synced right now."),
        },
    )


class ReprocessApi(APIView):
    """Base of the three reprocess levels: parse, call the domain, answer 202."""

    permission_classes = [IsAuthenticated, CanReprocess]
    input_serializer = ReprocessInputSerializer

    def reprocess(self, request, *, level: str, **scope):
        data = _validated(self.input_serializer, request.data)
        try:
            run = reprocess_run_create(
                level=level,
                actor=request.user.get_username(),
                reason=data["reason"],
                dry_run=data["dry_run"],
                **scope,
                **{k: data[k] for k in ("error_code", "status") if k in data},
            )
        except ReprocessError as exc:
            return Response({"detail": exc.message}, status=ERROR_STATUS[exc.kind])
        queued = run.is_queued
        body = {
            "run_id": run.pk, "dry_run": data["dry_run"], "queued": queued,
            "records": run.records_selected if queued else run.records_expected,
            "batches": run.batches_selected if queued else run.batches_expected,
        }
        return Response(ReprocessQueuedSerializer(body).data, status=status.HTTP_202_ACCEPTED)


class ReprocessAllApi(ReprocessApi):
    """Reprocess every incomplete batch (the header button)."""

    @_reprocess_schema(ReprocessInputSerializer)
    def post(self, request):
        return self.reprocess(request, level=ReprocessLevel.ALL)


class BatchReprocessApi(ReprocessApi):
    """Reprocess one batch (the row button)."""

    @_reprocess_schema(ReprocessInputSerializer)
    def post(self, request, batch_id: int):
        return self.reprocess(request, level=ReprocessLevel.BATCH, batch_id=batch_id)


class ErrorSummaryReprocessApi(ReprocessApi):
    """Reprocess one (error code, status) group of a batch (a summary line's button)."""

    input_serializer = ErrorSummaryReprocessInputSerializer

    @_reprocess_schema(ErrorSummaryReprocessInputSerializer)
    def post(self, request, batch_id: int):
        return self.reprocess(request, level=ReprocessLevel.ERROR_SUMMARY, batch_id=batch_id)


class ReprocessRunDetailApi(APIView):
    """A reprocess run and its progress: its records by their current status."""

    class RunSerializer(serializers.ModelSerializer):
        # Plain text: the record status enum belongs to the Record component.
        status = serializers.CharField(help_text="The summary group's status, if any.")
        batch = serializers.IntegerField(source="batch_id", allow_null=True)
        object_name = serializers.CharField(read_only=True)
        progress = inline_serializer(
            "ReprocessProgress",
            {
                "completed": serializers.IntegerField(),
                "errored": serializers.IntegerField(),
                "pending": serializers.IntegerField(),
                "ignored": serializers.IntegerField(),
            },
            source="current_progress",
        )
        queued = serializers.BooleanField(
            source="is_queued",
            help_text="false while a large run is still queueing its records (chunk by chunk).",
        )
        finished = serializers.BooleanField(source="is_finished")

        class Meta:
            model = ReprocessRun
            fields = ["id", "level", "batch", "error_code", "status", "object_name", "actor",
                      "reason", "records_expected", "batches_expected", "records_selected",
                      "batches_selected", "created_at", "queued_at", "queued", "finished_at",
                      "finished", "progress"]

    @extend_schema(responses={200: RunSerializer, 404: Detail})
    def get(self, request, run_id: int):
        run = ReprocessRun.objects.filter(pk=run_id).first()
        if run is None:
            raise NotFound(f"Reprocess run {run_id} does not exist.")
        run.current_progress = run.progress()
        run.mark_finished(run.current_progress)
        return Response(self.RunSerializer(run).data)


def _batch(batch_id: int) -> AggregatedBatch:
    batch = AggregatedBatch.objects.filter(pk=batch_id).first()
    if batch is None:
        raise NotFound(f"Batch {batch_id} does not exist.")
    return batch

