from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from tests.factories import event_payload
from usage_sync.ingest import COPY_FROM_EVENTS, MAX_EVENTS_PER_REQUEST
from usage_sync.models import RecordStatus, UsageEvent, UsageRecord

URL = "/api/v1/usage-events/"

pytestmark = pytest.mark.django_db

# A small call is bound as array parameters, a large one COPYed: both must behave alike.
CALL_SIZES = pytest.mark.parametrize("filler", [0, COPY_FROM_EVENTS], ids=["small", "copied"])


def fill(events: list[dict], filler: int) -> list[dict]:
    """The events, then `filler` more of ids of their own."""
    return events + [event_payload(10_000 + n) for n in range(filler)]


def test_it_stores_a_list_of_events(api_client):
    events = [event_payload(n) for n in range(25)]

    response = api_client.post(URL, events, format="json")

    assert response.status_code == 201, response.json()
    assert response.json() == {"received": 25, "created": 25, "duplicates": 0}
    stored = UsageEvent.objects.get(event_id="api-00000003")
    assert stored.client_acct_id == "ACCT-3"
    assert stored.usage_units == Decimal("2.5")
    # Added into the open record of its window and key, which no batch holds yet.
    assert (stored.record.status, stored.record.batch, stored.record.client_record_id) == (
        "OPEN", None, None
    )
    assert stored.record.events.count() == stored.record.event_count


@CALL_SIZES
def test_a_resent_event_id_is_counted_as_a_duplicate_and_stored_once(api_client, filler):
    api_client.post(URL, [event_payload(1), event_payload(2)], format="json")

    response = api_client.post(
        URL, fill([event_payload(2), event_payload(3), event_payload(3)], filler), format="json"
    )

    assert response.json() == {"received": 3 + filler, "created": 1 + filler, "duplicates": 2}
    assert UsageEvent.objects.filter(event_id__in=["api-00000002", "api-00000003"]).count() == 2


def test_one_bad_item_rejects_the_whole_request_and_names_index_and_field(api_client):
    events = [event_payload(n) for n in range(5)]
    events[3]["usage_units"] = "-4"
    events[4]["usage_date"] = "yesterday"

    response = api_client.post(URL, events, format="json")

    assert response.status_code == 400
    body = response.json()
    assert {"index": 3, "field": "usage_units", "message": "Must not be negative."} in body[
        "errors"
    ]
    assert {(e["index"], e["field"]) for e in body["errors"]} == {
        (3, "usage_units"),
        (4, "usage_date"),
    }
    assert "nothing was stored" in body["detail"]
    assert UsageEvent.objects.count() == 0


@pytest.mark.parametrize(
    ("override", "field", "message_part"),
    [
        ({"event_id": ""}, "event_id", "required"),
        ({"event_id": "x" * 101}, "event_id", "At most 100"),
        ({"client_acct_id": None}, "client_acct_id", "client_acct_id or acct_no"),
        ({"usage_type_code": ""}, "usage_type_code", "usage_type_code or usage_type"),
        ({"usage_units": "ten"}, "usage_units", "not a number"),
        ({"usage_units": None}, "usage_units", "required"),
        ({"usage_units": True}, "usage_units", "number"),
        ({"usage_units": "1.1234567"}, "usage_units", "decimal places"),
        ({"usage_date": "2026-13-01T00:00:00Z"}, "usage_date", "ISO 8601"),
        ({"usage_date": 20261101}, "usage_date", "ISO 8601"),
        ({"acct_no": "12a"}, "acct_no", "integer"),
        ({"amount": "1.001"}, "amount", "decimal places"),
        ({"qualifier_1": "q" * 301}, "qualifier_1", "At most 300"),
        ({"colour": "red"}, "colour", "Unknown field"),
        ({"comments": 5}, "comments", "string"),
    ],
)
def test_each_kind_of_bad_value_is_named(api_client, override, field, message_part):
    response = api_client.post(URL, [event_payload(1, **override)], format="json")

    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["index"] == 0
    assert error["field"] == field
    assert message_part in error["message"]


def test_an_account_number_alone_identifies_the_account(api_client):
    event = event_payload(1, client_acct_id=None, acct_no=12345, usage_type_code=None, usage_type=7)

    response = api_client.post(URL, [event], format="json")

    assert response.status_code == 201
    stored = UsageEvent.objects.get()
    assert (stored.acct_no, stored.usage_type, stored.client_acct_id) == (12345, 7, "")


def test_a_date_without_offset_is_read_as_utc(api_client):
    api_client.post(URL, [event_payload(1, usage_date="2026-11-20 08:30:00")], format="json")

    assert UsageEvent.objects.get().usage_date.isoformat() == "2026-11-20T08:30:00+00:00"


def test_the_body_must_be_a_list(api_client):
    response = api_client.post(URL, event_payload(1), format="json")

    assert response.status_code == 400
    assert "JSON list" in response.json()["detail"]


def test_more_than_the_maximum_number_of_events_is_refused(api_client):
    events = [{"event_id": str(n)} for n in range(MAX_EVENTS_PER_REQUEST + 1)]

    response = api_client.post(URL, events, format="json")

    assert response.status_code == 413
    assert "At most 10000 events" in response.json()["detail"]
    assert UsageEvent.objects.count() == 0


def test_anonymous_callers_get_401():
    response = APIClient().post(URL, [event_payload(1)], format="json")

    assert response.status_code == 401
    assert UsageEvent.objects.count() == 0


def test_a_logged_in_session_may_ingest(user):
    client = APIClient(enforce_csrf_checks=False)
    client.force_login(user)

    response = client.post(URL, [event_payload(1)], format="json")

    assert response.status_code == 201


@CALL_SIZES
def test_an_event_id_resent_with_other_content_is_a_conflict_and_nothing_is_stored(
    api_client, filler
):
    api_client.post(URL, [event_payload(1), event_payload(2)], format="json")
    correction = event_payload(2, usage_units="3.5", client_acct_id="ACCT-9")

    response = api_client.post(URL, fill([event_payload(7), correction, event_payload(1)],
                                          filler), format="json")

    assert response.status_code == 409
    body = response.json()
    assert body["conflicts"] == [
        {"event_id": "api-00000002", "indexes": [1], "fields": ["client_acct_id", "usage_units"]}
    ]
    assert "nothing was stored" in body["detail"]
    assert UsageEvent.objects.count() == 2
    assert UsageEvent.objects.get(event_id="api-00000002").usage_units == Decimal("2.5")


@CALL_SIZES
def test_the_same_content_written_otherwise_is_still_a_duplicate(api_client, filler):
    api_client.post(URL, [event_payload(1, usage_units="2.5", amount="10")], format="json")

    response = api_client.post(
        URL, fill([event_payload(1, usage_units="2.500000", amount=10.0)], filler),
        format="json",
    )

    assert response.status_code == 201
    assert response.json() == {"received": 1 + filler, "created": filler, "duplicates": 1}


def test_a_copied_call_adds_each_event_into_its_open_record_once(api_client):
    events = [event_payload(n, client_acct_id=f"ACCT-{n % 3}") for n in range(COPY_FROM_EVENTS)]
    api_client.post(URL, events[:10], format="json")

    response = api_client.post(URL, events, format="json")

    assert response.json() == {
        "received": COPY_FROM_EVENTS, "created": COPY_FROM_EVENTS - 10, "duplicates": 10
    }
    records = UsageRecord.objects.filter(status=RecordStatus.OPEN)
    assert sum(r.event_count for r in records) == COPY_FROM_EVENTS
    assert sum(r.usage_units for r in records) == sum(
        e.usage_units for e in UsageEvent.objects.all()
    )
    assert not UsageEvent.objects.filter(record__isnull=True).exists()


def test_one_event_id_twice_in_a_request_with_other_content_is_a_conflict(api_client):
    response = api_client.post(
        URL, [event_payload(1), event_payload(2), event_payload(1, amount="4.20")], format="json"
    )

    assert response.status_code == 409
    assert response.json()["conflicts"] == [
        {"event_id": "api-00000001", "indexes": [0, 2], "fields": ["amount"]}
    ]
    assert not UsageEvent.objects.exists()
