"""Validate raw usage events and store them once per `event_id`.

The API and the file import share this module: one validator, and the rule of what makes
a re-sent event a duplicate or a conflict (its content: events.CONTENT). Validation is
hand-written rather than a DRF serializer per item because ingest is the hot path (tens of
thousands of events a second); the rules are the README's (REST API).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from django.db import connection, transaction

from . import grouping, metrics
from .events import COLUMNS, FIELDS, Conflict, ValidEvent, conflict, conflicts_sql, differing
from .staging import EventStage

MAX_EVENTS_PER_REQUEST = 10_000
KNOWN_FIELDS = frozenset(COLUMNS)

_TEXT_FIELDS = tuple((f.name, f.max_length) for f in FIELDS if f.kind == "text")
_INT_LIMIT = 2**63


@dataclasses.dataclass(frozen=True, slots=True)
class _DecimalRule:
    """How a decimal field is checked, from the shape of its column."""

    name: str
    places: int
    whole_digits: int  # max digits - decimal places
    required: bool
    allow_negative: bool
    bound: Decimal  # 10 ** whole_digits, computed once: it is read for every event
    quantum: Decimal  # 10 ** -places


def _decimal_rule(field) -> _DecimalRule:
    whole_digits = field.digits - field.places
    return _DecimalRule(
        field.name, field.places, whole_digits, required=field.name == "usage_units",
        allow_negative=field.name not in ("usage_units", "rate"),
        bound=Decimal(10) ** whole_digits, quantum=Decimal(1).scaleb(-field.places),
    )


_DECIMAL_RULES = tuple(_decimal_rule(f) for f in FIELDS if f.kind == "decimal")

# validate_row checks the fields in the order its errors are listed (texts, integers and
# date, decimals); this puts the values back in COLUMNS order.
_CHECKED = (
    *(name for name, _ in _TEXT_FIELDS), "acct_no", "usage_type", "usage_date",
    *(rule.name for rule in _DECIMAL_RULES),
)
assert sorted(_CHECKED) == sorted(COLUMNS) and _CHECKED[0] == "event_id"
_in_column_order = operator.itemgetter(*(_CHECKED.index(name) for name in COLUMNS))
_CLIENT_ACCT_ID, _ACCT_NO, _USAGE_TYPE_CODE, _USAGE_TYPE = map(
    _CHECKED.index, ("client_acct_id", "acct_no", "usage_type_code", "usage_type"))


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


def _parse_text(value, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError("Must be a string.")
    if len(value) > limit:
        raise ValueError(f"At most {limit} characters (got {len(value)}).")
    if problem := _text_problem(value):
        raise ValueError(problem)
    return value


def _parse_decimal(rule: _DecimalRule, value) -> Decimal | None:
    if value is None or value == "":
        if rule.required:
            raise ValueError("This field is required.")
        return None
    if type(value) is Decimal:
        number = value  # JSON numbers arrive as Decimal already: exact, nothing to strip
    elif isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError("Must be a number.")
    else:
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError(f"{_shown(value)} is not a number.") from None
    if not number.is_finite():
        raise ValueError("Must be a finite number.")
    if not rule.allow_negative and number < 0:
        raise ValueError("Must not be negative.")
    # The common case in one comparison: below the bound, quantize keeps every digit.
    if abs(number) < rule.bound and number == number.quantize(rule.quantum):
        return number
    # Which rule it breaks, exactly at any size (quantize cannot hold more than 28 digits).
    _, digits, exponent = number.as_tuple()
    beyond = -exponent - rule.places
    if beyond > 0 and any(digits[-beyond:]):
        raise ValueError(f"At most {rule.places} decimal places.")
    if abs(number) >= rule.bound:
        raise ValueError(f"Must be smaller than 10^{rule.whole_digits}.")
    return number


def _parse_int(value) -> int | None:
    if value is None or value == "":
        return None
    if type(value) is int and 0 < value < _INT_LIMIT:
        return value
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
    if not 0 < number < _INT_LIMIT:
        raise ValueError("Must be a positive integer.")
    return number


def _parse_datetime(value) -> datetime:
    if value is None or value == "":
        raise ValueError("This field is required.")
    if not isinstance(value, str):
        raise ValueError("Must be an ISO 8601 date-time string.")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{_shown(value)} is not an ISO 8601 date-time.") from None
    if moment.tzinfo is UTC:
        return moment
    # Aria's own usage_date has no offset; a value without one is read as UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 is before year 1 in UTC
        raise ValueError(f"{_shown(value)} is out of the supported date range.") from None


_OTHER_FIELDS = (("acct_no", _parse_int), ("usage_type", _parse_int),
                 ("usage_date", _parse_datetime))


def validate_row(index: int, raw: object) -> tuple[tuple | None, list[FieldError]]:
    """Check one raw event; return its values in COLUMNS order, or the errors naming each
    field. The file import's hot path: no ValidEvent is built."""
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return None, [FieldError(index, "non_field_errors", "Each event must be a JSON object.")]
    errors: list[FieldError] = []
    if not KNOWN_FIELDS.issuperset(raw):
        for field in sorted(set(raw) - KNOWN_FIELDS):
            errors.append(FieldError(index, field, "Unknown field."))
    get = raw.get
    # A field that fails is None here, like a blank optional one; `errors` tells them apart.
    values: list = []
    for name, limit in _TEXT_FIELDS:
        value = get(name)
        if value is None or value == "":
            values.append("")
        elif type(value) is str and len(value) <= limit and value.isascii() and (
            "\x00" not in value
        ):
            values.append(value)  # plain ASCII: nothing PostgreSQL could refuse
        else:
            try:
                values.append(_parse_text(value, limit))
            except ValueError as exc:
                errors.append(FieldError(index, name, str(exc)))
                values.append(None)
    if values[0] is not None and not values[0].strip():
        errors.append(FieldError(index, "event_id", "This field is required."))
    for name, parse in _OTHER_FIELDS:
        try:
            values.append(parse(get(name)))
        except ValueError as exc:
            errors.append(FieldError(index, name, str(exc)))
            values.append(None)
    for rule in _DECIMAL_RULES:
        try:
            values.append(_parse_decimal(rule, get(rule.name)))
        except ValueError as exc:
            errors.append(FieldError(index, rule.name, str(exc)))
            values.append(None)
    if not values[_CLIENT_ACCT_ID] and values[_ACCT_NO] is None:
        if not any(e.field in ("client_acct_id", "acct_no") for e in errors):
            errors.append(FieldError(
                index, "client_acct_id", "One of client_acct_id or acct_no is required."
            ))
    if not values[_USAGE_TYPE_CODE] and values[_USAGE_TYPE] is None:
        if not any(e.field in ("usage_type_code", "usage_type") for e in errors):
            errors.append(FieldError(
                index, "usage_type_code", "One of usage_type_code or usage_type is required."
            ))
    if errors:
        return None, errors
    return _in_column_order(values), []


def validate_event(index: int, raw: object) -> tuple[ValidEvent | None, list[FieldError]]:
    """Check one raw event; return it normalized, or the errors naming each field."""
    row, errors = validate_row(index, raw)
    return (None if row is None else ValidEvent(*row)), errors


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


def count_ingested_on_commit(created: int, duplicates: int) -> None:
    """Count stored events when they are durable, not when an outer transaction may still
    roll back."""

    def count() -> None:
        metrics.EVENTS_INGESTED.inc(created)
        metrics.EVENTS_DUPLICATE.inc(duplicates)

    transaction.on_commit(count)


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
            conflicts.append(Conflict(event.event_id, differing(first, event)))
    if conflicts:
        raise EventConflict(conflicts)
    with transaction.atomic():
        created, conflicts = _store(list(unique.values()))
        if conflicts:
            raise EventConflict(conflicts)
        duplicates = len(events) - created
        count_ingested_on_commit(created, duplicates)
    return StoreResult(received=len(events), created=created, duplicates=duplicates)


# From this many events a call is COPYed into a temporary table (staging.py): binding the
# events as array parameters costs ~35 µs an event in Python, a binary COPY a few, but
# creating the table costs ~2 ms, more than a small call's arrays.
COPY_FROM_EVENTS = 100


def _store(events: list[ValidEvent]) -> tuple[int, list[Conflict]]:
    """Store unique events, each added into its open record (grouping.py); return how many
    were created and, if some were not, the conflicts among those."""
    with connection.cursor() as cursor:
        if len(events) >= COPY_FROM_EVENTS:
            stage = EventStage.create(cursor)
            with stage.rows() as add:
                for index, event in enumerate(events):
                    add(index, _row(event))
            stored = stage.store(max_conflicts=len(events))
            return stored.created, [c for _, c in stored.conflicts]
        source, params = _arrays(events)
        created = grouping.store(source, params)
        if created == len(events):
            return created, []
        # A statement of its own, so it sees what a concurrent call committed meanwhile;
        # its own rows match themselves. In code point order, as a staged call lists them.
        join, flags = conflicts_sql(source)
        cursor.execute(
            f'SELECT i.event_id, {flags} FROM {join} ORDER BY i.event_id COLLATE "C"', params
        )
        return created, [conflict(event_id, flags) for event_id, *flags in cursor.fetchall()]


_PG_TYPES = tuple(f"{f.pg_type}[]" for f in FIELDS)


def _arrays(events: list[ValidEvent]) -> tuple[str, dict]:
    """unnest() over the events' columns: the SQL and its parameters (one array each)."""
    arrays = ", ".join(f"%(c{n})s::{pg_type}" for n, pg_type in enumerate(_PG_TYPES))
    columns = zip(*map(_row, events), strict=True)
    params = {f"c{n}": list(column) for n, column in enumerate(columns)}
    return f"unnest({arrays}) AS i({', '.join(COLUMNS)})", params
