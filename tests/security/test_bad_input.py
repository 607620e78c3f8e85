"""Oversized and malformed requests get a clear 4xx in JSON, never a 500 or an HTML page."""

import json

import pytest
from django.conf import settings as django_settings

from tests.factories import event_payload, make_batch
from usage_sync.ingest import MAX_EVENTS_PER_REQUEST
from usage_sync.models import UsageEvent

URL = "/api/v1/usage-events/"

pytestmark = pytest.mark.django_db


def small_event(n: int) -> dict:
    return {"event_id": f"e{n}", "acct_no": 7, "usage_type": 1, "usage_units": 1,
            "usage_date": "2026-11-20T10:00:00Z"}


def test_more_than_10000_events_is_a_413_naming_the_limit(operator_api):
    events = [small_event(n) for n in range(MAX_EVENTS_PER_REQUEST + 1)]

    response = operator_api.post(URL, events, format="json")

    assert response.status_code == 413
    assert "10000" in response.json()["detail"]
    assert "10001" in response.json()["detail"]
    assert not UsageEvent.objects.exists()


def test_exactly_10000_events_are_accepted(operator_api):
    events = [small_event(n) for n in range(MAX_EVENTS_PER_REQUEST)]

    response = operator_api.post(URL, events, format="json")

    assert response.status_code == 201, response.content[:500]
    assert UsageEvent.objects.count() == MAX_EVENTS_PER_REQUEST


def test_the_default_body_limit_takes_10000_realistic_events():
    realistic = json.dumps([event_payload(n, qualifier_1="region-eu-west-1",
                                         comments="x" * 200) for n in range(10_000)])
    assert len(realistic) < django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE


@pytest.mark.parametrize(
    "url",
    [URL, "/api/v1/reprocess/all/", "/api/v1/batches/1/reprocess/",
     "/api/v1/batches/1/error-summary/reprocess/"],
)
def test_a_body_over_the_size_limit_is_a_413_in_json_naming_the_limit(operator_api, url):
    limit = django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    body = b'["' + b"x" * limit + b'"]'

    response = operator_api.post(url, body, content_type="application/json")

    assert response.status_code == 413
    assert response["Content-Type"] == "application/json"
    detail = response.json()["detail"]
    assert f"{limit:,}" in detail and "DATA_UPLOAD_MAX_MEMORY_SIZE" in detail
    assert not UsageEvent.objects.exists()


def test_the_size_limit_follows_the_setting(operator_api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    events = [small_event(n) for n in range(100)]

    response = operator_api.post(URL, events, format="json")

    assert response.status_code == 413
    assert "4,096 bytes" in response.json()["detail"]


@pytest.mark.parametrize("url", [URL, "/api/v1/reprocess/all/"])
def test_json_nested_absurdly_deep_is_a_400_not_a_500(operator_api, url):
    body = b"[" * 50_000 + b"]" * 50_000

    response = operator_api.post(url, body, content_type="application/json")

    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]


@pytest.mark.parametrize("body", [b"[{", b"\xff\xfe", b'{"a": NaN}', b"[1,]"])
def test_malformed_json_is_a_400_in_json(operator_api, body):
    response = operator_api.post(URL, body, content_type="application/json")

    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


# --- each field error is named -----------------------------------------------------------

STRING_FIELDS = ["event_id", "client_acct_id", "usage_type_code", "qualifier_1", "qualifier_2",
                 "qualifier_3", "qualifier_4"]


@pytest.mark.parametrize("field", STRING_FIELDS)
def test_a_string_over_the_columns_max_length_is_named(operator_api, field):
    limit = UsageEvent._meta.get_field(field).max_length

    at_limit = operator_api.post(URL, [event_payload(1, **{field: "y" * limit})], format="json")
    over = operator_api.post(URL, [event_payload(2, **{field: "y" * (limit + 1)})], format="json")

    assert at_limit.status_code == 201, at_limit.json()
    assert over.status_code == 400
    assert over.json()["errors"] == [
        {"index": 0, "field": field, "message": f"At most {limit} characters (got {limit + 1})."}
    ]


@pytest.mark.parametrize(
    ("override", "field", "message_part"),
    [
        ({"usage_date": "2026-11-31T00:00:00Z"}, "usage_date", "not an ISO 8601"),
        ({"usage_date": "0001-01-01T00:00:00+05:00"}, "usage_date", "out of the supported"),
        ({"usage_date": ["2026-11-20"]}, "usage_date", "ISO 8601 date-time string"),
        ({"usage_units": "-0.000001"}, "usage_units", "negative"),
        ({"usage_units": -3}, "usage_units", "negative"),
        ({"rate": "-1"}, "rate", "negative"),
        ({"usage_units": "12 units"}, "usage_units", "not a number"),
        ({"usage_units": "Infinity"}, "usage_units", "finite"),
        ({"usage_units": "1e20"}, "usage_units", "smaller than"),
        ({"usage_units": {"value": 1}}, "usage_units", "number"),
        ({"amount": [1]}, "amount", "number"),
        ({"acct_no": 1.5}, "acct_no", "integer"),
        ({"acct_no": 2**63}, "acct_no", "positive integer"),
        ({"usage_type": "²"}, "usage_type", "integer"),
        ({"client_acct_id": 42}, "client_acct_id", "string"),
        ({"event_id": ["a"]}, "event_id", "string"),
        ({"qualifier_2": {"k": "v"}}, "qualifier_2", "string"),
        ({"event_id": "a\x00b"}, "event_id", "NUL"),
        ({"comments": "\x00"}, "comments", "NUL"),
        ({"priority": "high"}, "priority", "Unknown field"),
    ],
)
def test_each_bad_value_is_named_with_its_field(operator_api, override, field, message_part):
    response = operator_api.post(URL, [event_payload(0), event_payload(1, **override)],
                                 format="json")

    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert (error["index"], error["field"]) == (1, field)
    assert message_part in error["message"]
    assert not UsageEvent.objects.exists()


@pytest.mark.parametrize("field", ["event_id", "usage_units", "usage_date"])
def test_a_missing_required_field_is_named(operator_api, field):
    event = event_payload(1)
    del event[field]

    response = operator_api.post(URL, [event], format="json")

    assert response.json()["errors"] == [
        {"index": 0, "field": field, "message": "This field is required."}
    ]


def test_a_lone_surrogate_is_refused_and_the_answer_stays_valid_json(operator_api):
    body = (
        b'[{"event_id": "a\\ud800", "\\udfff": 1, "client_acct_id": "A",'
        b' "usage_type_code": "U", "usage_units": "1", "usage_date": "2026-11-20T10:00:00Z"}]'
    )

    response = operator_api.post(URL, body, content_type="application/json")

    assert response.status_code == 400
    named = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert "surrogate" in named["event_id"]
    assert named["\\udfff"] == "Unknown field."
    assert not UsageEvent.objects.exists()


def test_an_error_quotes_a_huge_bad_value_briefly(operator_api):
    response = operator_api.post(URL, [event_payload(1, usage_units="9x" * 500_000)],
                                 format="json")

    [error] = response.json()["errors"]
    assert error["field"] == "usage_units"
    assert len(error["message"]) < 100
    assert len(response.content) < 1000


def test_reprocess_input_errors_name_the_field(operator_api, published):
    batch = make_batch(errors={"1009": 1})

    response = operator_api.post(
        f"/api/v1/batches/{batch.id}/error-summary/reprocess/",
        {"status": "ERROR", "error_code": "x" * 21, "dry_run": "maybe"}, format="json",
    )

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"error_code", "dry_run"}


# --- junk in query strings -----------------------------------------------------------------

# NUL (PostgreSQL text refuses it), a digit int() refuses, a number past bigint, a
# negative, a long non-ASCII string.
JUNK = ["a\x00b", "²", "9" * 30, "-1", "é" * 300]
PARAMS = ["q", "id", "event_id", "account", "batch", "error_code", "status", "level",
          "start_date", "end_date",
          "sort", "ordering", "page", "page_size", "run", "incomplete", "cursor"]


def get_pages(ids):
    from tests.security.endpoints import endpoints

    return [e.url(**ids) for e in endpoints()
            if (e.is_api or e.is_console_page) and e.route not in ("logout/",)]


# Committed data (transactional_db): a database error in one request cannot poison the next.
@pytest.mark.parametrize("junk", JUNK, ids=repr)
def test_junk_in_any_query_parameter_of_any_page_is_never_a_500(
    transactional_db, operator, junk, published
):
    from django.test import Client

    from reprocess.models import ReprocessRun

    client = Client(raise_request_exception=False)
    client.force_login(operator)
    batch = make_batch(errors={"1009": 1})
    run = ReprocessRun.objects.create(level="BATCH", batch=batch, actor="x")
    ids = {"batch_id": batch.id, "run_id": run.id, "record_id": batch.records.first().id}
    failures = []
    for url in get_pages(ids):
        for param in PARAMS:
            response = client.get(url, {param: junk, "level": "BATCH"} if param != "level"
                                  else {param: junk})
            if response.status_code >= 500:
                failures.append(f"{url}?{param}={junk!r}")
    assert failures == [], "\n".join(failures)
