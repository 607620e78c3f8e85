"""What a raw usage event is: its fields, their limits, how they are stored, and when two
events with one event_id are the same event.

One declaration, read from the UsageEvent model, from which ingest's validation, its bulk
insert and the API's schema are all derived, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal

from django.db import connection, models

from .models import UsageEvent

# The fields an event carries, in the order ingest stores them (ValidEvent's order).
COLUMNS = (
    "event_id", "client_acct_id", "acct_no", "usage_type_code", "usage_type", "usage_units",
    "usage_date", "amount", "rate", "qualifier_1", "qualifier_2", "qualifier_3", "qualifier_4",
    "comments",
)
# Required by themselves; besides, one account field and one usage type field.
REQUIRED = frozenset({"event_id", "usage_units", "usage_date"})
# The column is unbounded text; a comment longer than this is a mistake, not usage.
COMMENT_LIMIT = 4000


@dataclasses.dataclass(frozen=True)
class EventField:
    name: str
    kind: str  # "text", "integer", "decimal" or "datetime"
    pg_type: str  # the column's type, for unnest() casts
    max_length: int | None = None
    digits: int | None = None
    places: int | None = None

    @property
    def required(self) -> bool:
        return self.name in REQUIRED


def _describe(field: models.Field) -> EventField:
    pg_type = field.db_type(connection)
    if isinstance(field, models.DecimalField):
        return EventField(field.name, "decimal", pg_type, digits=field.max_digits,
                          places=field.decimal_places)
    if isinstance(field, models.DateTimeField):
        return EventField(field.name, "datetime", pg_type)
    if isinstance(field, models.IntegerField):
        return EventField(field.name, "integer", pg_type)
    return EventField(field.name, "text", pg_type, max_length=field.max_length or COMMENT_LIMIT)


FIELDS = tuple(_describe(UsageEvent._meta.get_field(name)) for name in COLUMNS)
FIELD = {field.name: field for field in FIELDS}


# Not frozen: a frozen dataclass's __init__ costs ~2 µs an event on the API's hot path
# (object.__setattr__ per field); nothing changes an event once validated.
@dataclasses.dataclass(slots=True)
class ValidEvent:
    """An event that passed validation, normalized, its fields in COLUMNS order."""

    event_id: str
    client_acct_id: str
    acct_no: int | None
    usage_type_code: str
    usage_type: int | None
    usage_units: Decimal
    usage_date: datetime
    amount: Decimal | None
    rate: Decimal | None
    qualifier_1: str
    qualifier_2: str
    qualifier_3: str
    qualifier_4: str
    comments: str


assert tuple(f.name for f in dataclasses.fields(ValidEvent)) == COLUMNS


# What makes two events with one event_id the same event (received_at aside).
CONTENT = COLUMNS[1:]


@dataclasses.dataclass(frozen=True, slots=True)
class Conflict:
    """An event whose event_id is already taken by an event with other content."""

    event_id: str
    fields: tuple[str, ...]


def differing(first: ValidEvent, other: ValidEvent) -> tuple[str, ...]:
    """The CONTENT fields in which two events with one event_id differ."""
    return tuple(f for f in CONTENT if getattr(first, f) != getattr(other, f))


def conflicts_sql(source: str) -> tuple[str, str]:
    """The join of `source` (alias i) to the stored events whose content differs, and a
    select list of one flag per CONTENT field (true where it differs), for `conflict`."""
    table = UsageEvent._meta.db_table
    flags = ", ".join(f"i.{f} IS DISTINCT FROM e.{f}" for f in CONTENT)
    join = (
        f"{source} JOIN {table} e ON e.event_id = i.event_id "
        f"WHERE ({', '.join(f'i.{f}' for f in CONTENT)}) "
        f"IS DISTINCT FROM ({', '.join(f'e.{f}' for f in CONTENT)})"
    )
    return join, flags


def conflict(event_id: str, flags) -> Conflict:
    """The Conflict that a row of `conflicts_sql`'s flags describes."""
    return Conflict(event_id, tuple(f for f, d in zip(CONTENT, flags, strict=True) if d))
