"""Validate raw usage events and store them once per `event_id`.

The API and the file import share this module: one validator, one way to store.
Validation is hand-written rather than a DRF serializer per item because ingest is the
hot path (tens of thousands of events a second); the rules are the README's (REST API).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from django.db import connection, transaction

from . import metrics
from .events import COLUMNS, FIELDS, ValidEvent
from .models import UsageEvent

MAX_EVENTS_PER_REQUEST = 10_000

_STRING_LIMITS = {f.name: f.max_length for f in FIELDS if f.kind == "text"}
# (max digits, decimal places) of the columns the decimals go into.
_DECIMAL_SHAPES = {f.name: (f.digits, f.places) for f in FIELDS if f.kind == "decimal"}
KNOWN_FIELDS = frozenset(COLUMNS)


# attrgetter, not dataclasses.astuple: astuple deep-copies every value (a third of the cost).
_row = operator.attrgetter(*COLUMNS)


@dataclasses.dataclass(frozen=True, slots=True)
class FieldError:
    index: int
    field: str
    message: str

    def as_dict(self) -> dict:
        return {"index": self.index, "field": _shown_name(self.field), "message": self.message}


@dataclasses.dataclass(frozen=True, slots=True)
class StoreResult:
    received: int
    created: int
    duplicates: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _blank(value) -> bool:
    return value is None or value == ""


def _shown(value, limit: int = 40) -> str:
    """Quote a rejected value for an error message, cut short: errors echo no megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-3:]


def _shown_name(name: str) -> str:
    """Return a field name fit for a JSON answer (an unknown key can be anything)."""
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name if len(name) <= 100 else name[:99] + "…"


def _text_problem(value: str) -> str | None:
    """Say why a string cannot be stored as text, or None: PostgreSQL text holds no NUL
    character, and UTF-8 has no lone surrogates (JSON's "\\ud800" escapes allow both)."""
    if "\x00" in value:
        return "Must not contain the NUL character (\\u0000)."
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "Must be valid Unicode text (no lone surrogate \\ud800-\\udfff)."
    return None


def _parse_decimal(field: str, value, *, required: bool, allow_negative: bool) -> Decimal | None:
    if _blank(value):
        if required:
            raise ValueError("This field is required.")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError("Must be a number.")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{_shown(value)} is not a number.") from None
    if not number.is_finite():
        raise ValueError("Must be a finite number.")
    if not allow_negative and number < 0:
        raise ValueError("Must not be negative.")
    digits, places = _DECIMAL_SHAPES[field]
    exponent = number.as_tuple().exponent
    if -exponent > places and number != number.quantize(Decimal(1).scaleb(-places)):
        raise ValueError(f"At most {places} decimal places.")
    if abs(number) >= Decimal(10) ** (digits - places):
        raise ValueError(f"Must be smaller than 10^{digits - places}.")
    return number


def _parse_int(value) -> int | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ValueError("Must be an integer.")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().removeprefix("-").isdecimal():
        try:
            number = int(value)
        except ValueError:  # more digits than int() takes from a string
            raise ValueError("Must be a positive integer.") from None
    else:
        raise ValueError(f"{_shown(value)} is not a valid integer.")
    if not 0 < number < 2**63:
        raise ValueError("Must be a positive integer.")
    return number


def _parse_datetime(value) -> datetime:
    if _blank(value):
        raise ValueError("This field is required.")
    if not isinstance(value, str):
        raise ValueError("Must be an ISO 8601 date-time string.")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{_shown(value)} is not an ISO 8601 date-time.") from None
    # Aria's own usage_date has no offset; a value without one is read as UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 is before year 1 in UTC
        raise ValueError(f"{_shown(value)} is out of the supported date range.") from None


def validate_event(index: int, raw: object) -> tuple[ValidEvent | None, list[FieldError]]:
    """Check one raw event; return it normalized, or the errors naming each field."""
    if not isinstance(raw, Mapping):
        return None, [FieldError(index, "non_field_errors", "Each event must be a JSON object.")]
    errors: list[FieldError] = []

    def fail(field: str, message: str) -> None:
        errors.append(FieldError(index, field, message))

    for field in sorted(set(raw) - KNOWN_FIELDS):
        fail(field, "Unknown field.")

    strings = {}
    for field, limit in _STRING_LIMITS.items():
        value = raw.get(field)
        if _blank(value):
            strings[field] = ""
        elif not isinstance(value, str):
            fail(field, "Must be a string.")
        elif len(value) > limit:
            fail(field, f"At most {limit} characters (got {len(value)}).")
        elif problem := _text_problem(value):
            fail(field, problem)
        else:
            strings[field] = value
    if "event_id" in strings and not strings["event_id"].strip():
        fail("event_id", "This field is required.")

    values = {}
    for field, parse in (
        ("acct_no", _parse_int),
        ("usage_type", _parse_int),
        ("usage_date", _parse_datetime),
    ):
        try:
            values[field] = parse(raw.get(field))
        except ValueError as exc:
            fail(field, str(exc))
    for field in _DECIMAL_SHAPES:
        try:
            values[field] = _parse_decimal(
                field,
                raw.get(field),
                required=field == "usage_units",
                allow_negative=field != "usage_units" and field != "rate",
            )
        except ValueError as exc:
            fail(field, str(exc))

    if not strings.get("client_acct_id") and values.get("acct_no") is None:
        if not any(e.field in ("client_acct_id", "acct_no") for e in errors):
            fail("client_acct_id", "One of client_acct_id or acct_no is required.")
    if not strings.get("usage_type_code") and values.get("usage_type") is None:
        if not any(e.field in ("usage_type_code", "usage_type") for e in errors):
            fail("usage_type_code", "One of usage_type_code or usage_type is required.")

    if errors:
        return None, errors
    return ValidEvent(**strings, **values), []


def validate_events(raw_events: Iterable[object], *, start: int = 0):
    """Validate many events; return (valid events, errors) with indexes from `start`."""
    valid: list[ValidEvent] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(raw_events, start):
        event, event_errors = validate_event(index, raw)
        if event_errors:
            errors.extend(event_errors)
        else:
            valid.append(event)
    return valid, errors


def _count_ingested(created: int, duplicates: int) -> None:
    metrics.EVENTS_INGESTED.inc(created)
    metrics.EVENTS_DUPLICATE.inc(duplicates)


@dataclasses.dataclass(frozen=True, slots=True)
class Conflict:
    """An event whose event_id is already taken by an event with other content."""

    event_id: str
    fields: tuple[str, ...]


class EventConflict(Exception):
    """Events reuse stored event_ids with other content; nothing of the call was stored."""

    def __init__(self, conflicts: list[Conflict]):
        super().__init__(f"{len(conflicts)} events reuse an event_id with other content")
        self.conflicts = conflicts


def store_events(events: list[ValidEvent]) -> StoreResult:
    """Insert the events not already stored (by `event_id`), atomically; count duplicates.

    The unique `event_id` is the guard: an event already stored with the same content is a
    duplicate (a re-send), counted and not stored again. The same event_id with other
    content is a conflict, like an idempotency key reused with other parameters: raises
    EventConflict, and nothing of the call is stored.
    """
    if not events:
        return StoreResult(received=0, created=0, duplicates=0)
    # In event_id order: two calls with overlapping ids take their locks in the same
    # order, so they queue instead of deadlocking.
    unique: dict[str, ValidEvent] = {}
    conflicts = []
    for event in sorted(events, key=operator.attrgetter("event_id")):
        first = unique.setdefault(event.event_id, event)
        if first != event:
            conflicts.append(Conflict(event.event_id, _differing(first, event)))
    if conflicts:
        raise EventConflict(conflicts)
    with transaction.atomic():
        created = _insert(list(unique.values()))
        if created < len(unique) and (conflicts := _conflicts(list(unique.values()))):
            raise EventConflict(conflicts)
        duplicates = len(events) - created
        # Counted when the events are durable, not when an outer transaction may still roll back.
        transaction.on_commit(lambda: _count_ingested(created, duplicates))
    return StoreResult(received=len(events), created=created, duplicates=duplicates)


# What makes two events with one event_id the same event (received_at aside).
CONTENT = COLUMNS[1:]


def _differing(first: ValidEvent, other: ValidEvent) -> tuple[str, ...]:
    return tuple(f for f in CONTENT if getattr(first, f) != getattr(other, f))


_PG_TYPES = tuple(f"{f.pg_type}[]" for f in FIELDS)


def _arrays(events: list[ValidEvent]) -> tuple[str, list]:
    """unnest() over the events' columns: the SQL and its parameters (one array each)."""
    arrays = ", ".join(f"%s::{pg_type}" for pg_type in _PG_TYPES)
    params = [list(column) for column in zip(*map(_row, events), strict=True)]
    return f"unnest({arrays}) AS i({', '.join(COLUMNS)})", params


def _insert(events: list[ValidEvent]) -> int:
    # One INSERT … SELECT FROM unnest(arrays): a single round trip per request.
    table = UsageEvent._meta.db_table
    source, params = _arrays(events)
    sql = (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}, received_at) "
        f"SELECT *, now() FROM {source} "
        "ON CONFLICT (event_id) DO NOTHING"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _conflicts(events: list[ValidEvent]) -> list[Conflict]:
    """The events whose event_id is stored with other content (a statement of its own, so
    it sees what a concurrent call committed meanwhile; its own rows match themselves)."""
    table = UsageEvent._meta.db_table
    source, params = _arrays(events)
    differs = ", ".join(f"i.{f} IS DISTINCT FROM e.{f}" for f in CONTENT)
    sql = (
        f"SELECT i.event_id, {differs} FROM {source} "
        f"JOIN {table} e ON e.event_id = i.event_id "
        f"WHERE ({', '.join(f'i.{f}' for f in CONTENT)}) "
        f"IS DISTINCT FROM ({', '.join(f'e.{f}' for f in CONTENT)}) "
        "ORDER BY i.event_id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [
            Conflict(event_id, tuple(f for f, d in zip(CONTENT, flags, strict=True) if d))
            for event_id, *flags in cursor.fetchall()
        ]
