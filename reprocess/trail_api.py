"""The usage trail over the REST API: search, a record's trail, an event's place."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from usage_sync.models import UsageEvent, UsageRecord

from . import trail
from .api import Detail, RecordSerializer


class TraceApi(APIView):
    """Find what a query names: an event id, a client record id, a receipt id, a batch id
    or an account (most specific first; empty when nothing is named so)."""

    class TraceSerializer(serializers.Serializer):
        query = serializers.CharField()
        matches = inline_serializer("TraceMatch", {
            "kind": serializers.ChoiceField(
                choices=["record", "event", "receipt", "batch", "account"]),
            "label": serializers.CharField(),
            "url": serializers.CharField(help_text="The console page it lands on."),
        }, many=True)

    @extend_schema(
        parameters=[OpenApiParameter("q", str, required=True, description="What to look for.")],
        responses={200: TraceSerializer},
    )
    def get(self, request):
        query = request.query_params.get("q", "")
        matches = [
            {"kind": m.kind, "label": m.label, "url": m.url} for m in trail.find(query)
        ]
        return Response({"query": query, "matches": matches})


class HistorySerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    kind = serializers.ChoiceField(choices=["call", "reprocess"])
    title = serializers.CharField()
    outcome = serializers.CharField(help_text="The call's status, or what the run queued from.")
    record_outcome = serializers.CharField(
        help_text="What the call left this record as (e.g. ERROR 1009); empty when it "
        "cannot be told.")
    receipt_id = serializers.CharField(help_text="The call's client_receipt_id.")
    error_code = serializers.CharField()
    error_message = serializers.CharField()
    activity_id = serializers.IntegerField(allow_null=True,
                                           help_text="The call's activity log entry.")
    listed = serializers.BooleanField(
        help_text="False when the call's entry does not list the records it carried.")
    detail = serializers.CharField()


class RecordTrailApi(APIView):
    """A record with its history (each call that carried it, each reprocess run that
    queued it) and the count and sums of its raw events beside its own."""

    class RecordTrailSerializer(serializers.Serializer):
        record = RecordSerializer()
        history = HistorySerializer(many=True)
        events = inline_serializer("RecordEventSums", {
            "count": serializers.IntegerField(),
            "usage_units": serializers.DecimalField(max_digits=30, decimal_places=6),
            "amount": serializers.DecimalField(max_digits=28, decimal_places=2,
                                               allow_null=True),
            "agree": serializers.BooleanField(help_text="They add up to the record."),
        })

    @extend_schema(responses={200: RecordTrailSerializer, 404: Detail})
    def get(self, request, record_id: int):
        record = get_object_or_404(UsageRecord, pk=record_id)
        sums = trail.event_sums(record)
        return Response(self.RecordTrailSerializer({
            "record": record,
            "history": trail.record_history(record),
            "events": {"count": sums.events, "usage_units": sums.units,
                       "amount": sums.amount, "agree": sums.agree_with(record)},
        }).data)


class EventTrailApi(APIView):
    """Where an event went: its record and batch and that record's status, or when its
    window closes if it was not aggregated yet."""

    class EventTrailSerializer(serializers.Serializer):
        event_id = serializers.CharField()
        client_acct_id = serializers.CharField()
        acct_no = serializers.IntegerField(allow_null=True)
        usage_type_code = serializers.CharField()
        usage_units = serializers.DecimalField(max_digits=20, decimal_places=6)
        amount = serializers.DecimalField(max_digits=18, decimal_places=2, allow_null=True)
        usage_date = serializers.DateTimeField()
        received_at = serializers.DateTimeField()
        record = serializers.IntegerField(source="record_id", allow_null=True)
        client_record_id = serializers.CharField(source="record.client_record_id",
                                                 allow_null=True, default=None)
        record_status = serializers.CharField(source="record.status", allow_null=True,
                                              default=None)
        batch = serializers.IntegerField(source="record.batch_id", allow_null=True,
                                         default=None)
        window_closes_at = serializers.DateTimeField(allow_null=True)

    @extend_schema(
        parameters=[OpenApiParameter("event_id", str, required=True)],
        responses={200: EventTrailSerializer, 404: Detail},
    )
    def get(self, request):
        event_id = request.query_params.get("event_id", "")
        if not event_id or len(event_id) > trail.MAX_QUERY_LENGTH or "\x00" in event_id:
            raise NotFound("No such event.")
        event = get_object_or_404(UsageEvent.objects.select_related("record"),
                                  event_id=event_id)
        event.window_closes_at = None if event.record_id else trail.window_closes_at(event)
        return Response(self.EventTrailSerializer(event).data)
