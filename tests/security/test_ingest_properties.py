"""Properties of ingest validation, through POST /api/v1/usage-events/ on PostgreSQL.

Any valid list is accepted and stored exactly as sent; the same list with one corruption
in one event is refused with an error naming that event's index and the field, and
nothing at all is stored.
"""

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usage_sync.ingest import KNOWN_FIELDS
from usage_sync.models import UsageEvent, UsageRecord

URL = "/api/v1/usage-events/"

pytestmark = pytest.mark.django_db

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    # The API client and the database fixtures are set up once per test, on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any Unicode text PostgreSQL can store: no NUL, no lone surrogates.
TEXT_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")


def text(max_size: int, min_size: int = 0):
    return st.text(TEXT_CHARS, min_size=min_size, max_size=max_size)


def decimals(*, places: int, digits: int, min_value: Decimal | None = None):
    bound = Decimal(10) ** (digits - places) - Decimal(1).scaleb(-places)
    return st.decimals(
        min_value=-bound if min_value is None else min_value,
        max_value=bound,
        places=places,
        allow_nan=False,
        allow_infinity=False,
    )


def as_json_number(value: Decimal):
    """Send a decimal as a JSON string or, when exact, as a JSON number (both accepted)."""
    return st.sampled_from([str(value), int(value) if value == value.to_integral() else str(value)])


offsets = st.integers(min_value=-14 * 60 + 1, max_value=14 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=offsets
)


@st.composite
def valid_event(draw, n: int) -> dict:
    event = {
        # Unique within the list: the index makes it so.
        "event_id": f"{n}-" + draw(text(90)),
        "usage_units": draw(
            decimals(places=6, digits=20, min_value=Decimal(0)).flatmap(as_json_number)
        ),
        "usage_date": draw(moments).isoformat(),
    }
    if draw(st.booleans()):
        event["client_acct_id"] = draw(text(50, min_size=1))
    else:
        event["acct_no"] = draw(st.integers(min_value=1, max_value=2**63 - 1))
    if draw(st.booleans()):
        event["usage_type_code"] = draw(text(30, min_size=1))
    else:
        event["usage_type"] = draw(st.integers(min_value=1, max_value=2**63 - 1))
    optional = {
        "amount": decimals(places=2, digits=18).map(str),
        "rate": decimals(places=5, digits=18, min_value=Decimal(0)).map(str),
        "qualifier_1": text(300),
        "qualifier_2": text(300),
        "qualifier_3": text(300),
        "qualifier_4": text(300),
        "comments": text(4000),
    }
    for field in draw(st.sets(st.sampled_from(sorted(optional)))):
        event[field] = draw(optional[field])
    return event


event_lists = st.integers(min_value=1, max_value=6).flatmap(
    lambda size: st.tuples(*(valid_event(n) for n in range(size))).map(list)
)


def assert_stored_exactly(sent: dict) -> None:
    row = UsageEvent.objects.get(event_id=sent["event_id"])
    for field in ("client_acct_id", "usage_type_code", "qualifier_1", "qualifier_2",
                  "qualifier_3", "qualifier_4", "comments"):
        assert getattr(row, field) == sent.get(field, ""), field
    for field in ("acct_no", "usage_type"):
        assert getattr(row, field) == sent.get(field), field
    for field in ("usage_units", "amount", "rate"):
        expected = None if field not in sent else Decimal(str(sent[field]))
        assert getattr(row, field) == expected, field
    assert row.usage_date == datetime.fromisoformat(sent["usage_date"]).astimezone(UTC)
    # In the open record of its window and key, whose sums are its events'.
    record = row.record
    assert (record.status, record.batch_id) == ("OPEN", None)
    assert record.usage_date <= row.usage_date < record.window_end
    assert record.usage_units == sum(e.usage_units for e in record.events.all())


@PROPERTY
@given(events=event_lists)
def test_every_valid_list_is_accepted_and_stored_exactly(operator_api, events):
    UsageEvent.objects.all().delete()
    UsageRecord.objects.all().delete()  # the open records of the last example's events

    response = operator_api.post(URL, events, format="json")

    assert response.status_code == 201, response.json()
    assert response.json() == {"received": len(events), "created": len(events), "duplicates": 0}
    assert UsageEvent.objects.count() == len(events)
    for sent in events:
        assert_stored_exactly(sent)


# --- one corruption ----------------------------------------------------------------------

STRING_LIMITS = {"event_id": 100, "client_acct_id": 50, "usage_type_code": 30,
                 "qualifier_1": 300, "qualifier_2": 300, "qualifier_3": 300, "qualifier_4": 300,
                 "comments": 4000}
NOT_A_DATE = st.one_of(
    st.sampled_from(["yesterday", "2026-13-01T00:00:00Z", "2026-02-30", "2026-11-20T25:00:00",
                     "20-11-2026", "2026/11/20 10:00", "2026-11-20T10:00:00+25:00", "now", " "]),
    st.text(st.characters(categories=["L"]), min_size=1, max_size=20),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.booleans(),
)
NOT_A_NUMBER = st.one_of(
    st.sampled_from(["ten", "1,5", "1.2.3", "--1", "0x10", "1e", "$5", "∞", "NaN", "Infinity"]),
    st.text(st.characters(categories=["L"]), min_size=1, max_size=20),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.booleans(),
)
NOT_AN_INTEGER = st.one_of(
    st.integers(max_value=0), st.integers(min_value=2**63), st.booleans(),
    st.floats(allow_nan=False).filter(lambda f: f != int(f) if f == f and abs(f) != float("inf")
                                      else True),
    st.text(st.characters(categories=["L", "P"]), min_size=1, max_size=10),
    st.lists(st.integers(), max_size=2),
)
WRONG_TYPE = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(),
    st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.none()),
)


@st.composite
def corruption(draw, event: dict) -> tuple[dict, str]:
    """Return a copy of a valid event with one thing wrong, and the field it names."""
    event = dict(event)
    kind = draw(st.sampled_from(["date", "negative", "not_a_number", "unknown", "wrong_type",
                                 "too_long", "missing", "nul",
                                 "not_an_integer"]))
    if kind == "date":
        event["usage_date"] = draw(NOT_A_DATE)
        return event, "usage_date"
    if kind == "negative":
        event["usage_units"] = str(-draw(decimals(places=6, digits=20, min_value=Decimal(0))
                                         .filter(lambda d: d > 0)))
        return event, "usage_units"
    if kind == "not_a_number":
        field = draw(st.sampled_from(["usage_units", "amount", "rate"]))
        event[field] = draw(NOT_A_NUMBER)
        return event, field
    if kind == "unknown":
        field = draw(text(30, min_size=1).filter(lambda k: k not in KNOWN_FIELDS))
        event[field] = draw(WRONG_TYPE | st.text(max_size=5))
        return event, field
    if kind == "wrong_type":
        field = draw(st.sampled_from(sorted(STRING_LIMITS)))
        event[field] = draw(WRONG_TYPE)
        return event, field
    if kind == "not_an_integer":
        field = draw(st.sampled_from(["acct_no", "usage_type"]))
        event[field] = draw(NOT_AN_INTEGER)
        return event, field
    if kind == "too_long":
        field = draw(st.sampled_from(sorted(STRING_LIMITS)))
        limit = STRING_LIMITS[field]
        event[field] = "x" * draw(st.integers(min_value=limit + 1, max_value=limit + 50))
        return event, field
    if kind == "nul":
        field = draw(st.sampled_from(sorted(STRING_LIMITS)))
        event[field] = "a\x00b"
        return event, field
    # missing: a required field, or both fields of an either-or pair
    missing = draw(st.sampled_from(["event_id", "usage_units", "usage_date", "account",
                                    "usage type"]))
    if missing == "account":
        event.pop("client_acct_id", None)
        event.pop("acct_no", None)
        return event, "client_acct_id"
    if missing == "usage type":
        event.pop("usage_type_code", None)
        event.pop("usage_type", None)
        return event, "usage_type_code"
    if draw(st.booleans()):
        del event[missing]
    else:
        event[missing] = draw(st.sampled_from([None, ""]))
    return event, missing


@st.composite
def corrupted_lists(draw):
    events = draw(event_lists)
    index = draw(st.integers(min_value=0, max_value=len(events) - 1))
    events[index], field = draw(corruption(events[index]))
    return events, index, field


@PROPERTY
@given(case=corrupted_lists())
def test_any_single_corruption_is_refused_naming_index_and_field(operator_api, case):
    events, index, field = case

    response = operator_api.post(URL, events, format="json")

    assert response.status_code == 400, (field, events[index])
    body = response.json()
    assert "nothing was stored" in body["detail"]
    named = {(e["index"], e["field"]) for e in body["errors"]}
    assert (index, field) in named, body["errors"]
    assert {i for i, _ in named} == {index}, "only the corrupted event is named"
    assert all(e["message"] for e in body["errors"])
    assert not UsageEvent.objects.exists()
