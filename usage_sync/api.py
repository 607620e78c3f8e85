"""REST API of the ingest side: POST /api/v1/usage-events/."""

from drf_spectacular.utils import OpenApiExample, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .events import FIELDS, EventField
from .ingest import MAX_EVENTS_PER_REQUEST, EventConflict, store_events, validate_events


def _schema_field(field: EventField) -> serializers.Field:
    required = field.required
    if field.kind == "decimal":
        return serializers.DecimalField(max_digits=field.digits, decimal_places=field.places,
                                        required=required)
    if field.kind == "integer":
        return serializers.IntegerField(required=required)
    if field.kind == "datetime":
        return serializers.DateTimeField(required=required)
    return serializers.CharField(max_length=field.max_length, required=required)


# Documents the item shape for the schema, from the one description of an event's fields;
# validation is ingest.validate_event (hand-written for speed), from the same description.
EventSerializer = type(
    "EventSerializer", (serializers.Serializer,), {f.name: _schema_field(f) for f in FIELDS}
)


class UsageEventIngestApi(APIView):
    """Ingest a JSON list of raw usage events: all stored, or none and the errors."""

    @extend_schema(
        request=EventSerializer(many=True),
        responses={
            201: inline_serializer(
                "IngestResult",
                {
                    "received": serializers.IntegerField(),
                    "created": serializers.IntegerField(),
                    "duplicates": serializers.IntegerField(),
                },
            ),
            400: inline_serializer(
                "IngestErrors",
                {
                    "detail": serializers.CharField(),
                    "errors": inline_serializer(
                        "IngestFieldError",
                        {
                            "index": serializers.IntegerField(),
                            "field": serializers.CharField(),
                            "message": serializers.CharField(),
                        },
                        many=True,
                    ),
                },
            ),
            409: inline_serializer(
                "IngestConflicts",
                {
                    "detail": serializers.CharField(),
                    "conflicts": inline_serializer(
                        "IngestConflict",
                        {
                            "event_id": serializers.CharField(),
                            "indexes": serializers.ListField(child=serializers.IntegerField()),
                            "fields": serializers.ListField(child=serializers.CharField()),
                        },
                        many=True,
                    ),
                },
            ),
        },
        examples=[
            OpenApiExample(
                "One event",
                value=[
                    {
                        "event_id": "evt-0001",
                        "client_acct_id": "ACME-001",
                        "usage_type_code": "API_CALLS",
                        "usage_units": "12",
                        "usage_date": "2026-11-24T10:15:00Z",
                    }
                ],
                request_only=True,
            )
        ],
    )
    def post(self, request):
        payload = request.data
        if not isinstance(payload, list):
            return _bad_request("The body must be a JSON list of events.")
        if len(payload) > MAX_EVENTS_PER_REQUEST:
            return Response(
                {
                    "detail": f"At most {MAX_EVENTS_PER_REQUEST} events per request "
                    f"(got {len(payload)}); split the list."
                },
                status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        events, errors = validate_events(payload)
        if errors:
            return _bad_request(
                f"{len({e.index for e in errors})} of {len(payload)} events are invalid; "
                "nothing was stored.",
                errors=[e.as_dict() for e in errors[:1000]],
            )
        try:
            result = store_events(events)
        except EventConflict as exc:
            return _conflict(payload, exc)
        return Response(result.as_dict(), status=status.HTTP_201_CREATED)


def _conflict(payload: list, exc: EventConflict) -> Response:
    """409 naming each event_id reused with other content, where it is in the request
    and which fields differ from the event already stored under it."""
    positions: dict[str, list[int]] = {}
    for index, raw in enumerate(payload):
        positions.setdefault(raw["event_id"], []).append(index)
    conflicts = [
        {"event_id": c.event_id, "indexes": positions.get(c.event_id, []),
         "fields": list(c.fields)}
        for c in exc.conflicts[:1000]
    ]
    return Response(
        {
            "detail": f"{len(exc.conflicts)} event_id(s) were already used for events with "
            "other content (a correction needs a new event_id); nothing was stored.",
            "conflicts": conflicts,
        },
        status=status.HTTP_409_CONFLICT,
    )


def _bad_request(detail: str, errors: list | None = None) -> Response:
    return Response({"detail": detail, "errors": errors or []}, status=status.HTTP_400_BAD_REQUEST)
