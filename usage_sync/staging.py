"""Store many validated events set-based: COPY them into a temporary table, then ingest's
own statements (grouping.store) into the events and their open records, with ingest's
duplicate and conflict rules.

The file import and large API calls use it inside their transaction: `EventStage.create`,
`rows()` while they read the events, then `store()`; they count what was stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import grouping
from .events import COLUMNS, FIELDS, Conflict, conflict, conflicts_sql

STAGE = "usage_event_stage"
_COLUMNS = ", ".join(f"{field.name} {field.pg_type}" for field in FIELDS)
# Binary COPY: psycopg formats each value by its column's type (varchar(100) is a varchar),
# in C, and nothing needs escaping. Validation has already held every value to its column.
_COPY_TYPES = ("int4", *(field.pg_type.split("(")[0].strip() for field in FIELDS))
# Code point order, the order of Python's sorted() in ingest.store_events (UTF-8 bytes sort
# like code points), so every ingest takes its row locks in one order.
_LOCK_ORDER = 'i.event_id COLLATE "C", i.line'


@dataclasses.dataclass(frozen=True, slots=True)
class StageResult:
    created: int
    duplicates: int
    conflicts: list[tuple[int, Conflict]]  # (line, conflict), the first `max_conflicts`
    conflict_count: int


class EventStage:
    """A temporary table of validated events, each with the line it came from."""

    def __init__(self, cursor):
        self.cursor = cursor
        self.rows_staged = 0

    @classmethod
    def create(cls, cursor) -> EventStage:
        """Create the (empty) table; the caller's transaction must be open."""
        # ON COMMIT DROP for a crash's sake; `store` drops it, so that a second import in
        # the same outer transaction (a test, a caller's atomic block) starts afresh.
        cursor.execute(
            f"CREATE TEMPORARY TABLE {STAGE} (line integer NOT NULL, {_COLUMNS}) ON COMMIT DROP"
        )
        return cls(cursor)

    @contextmanager
    def rows(self) -> Iterator[Callable[[int, tuple], None]]:
        """COPY into the table: yield a function taking (line number, row in COLUMNS order).

        An exception out of the block aborts the COPY, and the transaction is doomed.
        """
        columns = ", ".join(COLUMNS)
        with self.cursor.copy(
            f"COPY {STAGE} (line, {columns}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(_COPY_TYPES)
            write_row = copy.write_row

            def add(line: int, row: tuple) -> None:
                write_row((line, *row))
                self.rows_staged += 1

            yield add

    def store(self, *, max_conflicts: int) -> StageResult:
        """Store the staged events not stored yet, set-based; count duplicates.

        As ingest.store_events: an event_id stored (or earlier in the stage) with the same
        content is a duplicate; with other content it is a conflict, and then the caller
        must roll back.
        """
        cursor = self.cursor
        # Each event added into its open record as it is stored (grouping.py).
        created = grouping.store(f"{STAGE} i", {}, order_by=_LOCK_ORDER)
        conflicts: list[tuple[int, Conflict]] = []
        count = 0
        if created < self.rows_staged:
            # A statement of its own, so it sees what a concurrent import committed while
            # the INSERT waited for it. Each line is compared with the stored event, which
            # for an event_id first seen in this file is its first line's.
            join, flags = conflicts_sql(f"{STAGE} i")
            cursor.execute(
                f"SELECT i.line, i.event_id, count(*) OVER (), {flags} FROM {join} "
                "ORDER BY i.line LIMIT %s",
                [max(max_conflicts, 1)],  # one row at least, for the count
            )
            rows = cursor.fetchall()
            count = rows[0][2] if rows else 0
            conflicts = [
                (line, conflict(event_id, differs))
                for line, event_id, _, *differs in rows[:max_conflicts]
            ]
        cursor.execute(f"DROP TABLE {STAGE}")
        return StageResult(created, self.rows_staged - created, conflicts, count)
