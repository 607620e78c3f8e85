"""Which record an event adds into, as set-based SQL: the one home of the grouping rule.

Ingest adds each new event into the OPEN record of its window and grouping key (one per
key, the unique index record_open_key) in the statement that stores the event, so the
event is stored already carrying its record id and closing a window touches records only.
A key is the window (start and end), the account, the usage type, the grouped qualifiers
('' for the others), the rate, and whether the event is priced upstream (an amount) or
rated by Aria: a record never mixes priced and unpriced events, or rates.

The rule comes from the configuration: events dated before `rule_changes_at` are grouped
by the rule in force before the last edit, later ones by the edited rule (models.py).
Records are upserted in key order, so concurrent ingests of the same keys queue on the row
locks instead of deadlocking; an event is summed only by the ingest that inserted it, so
none is counted twice or lost (`store`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.db import connection, transaction

from .deadlocks import run_again_on_deadlock
from .events import COLUMNS
from .models import AggregationConfig, UsageEvent, UsageRecord

logger = logging.getLogger(__name__)

_EVENT = UsageEvent._meta.db_table
_RECORD = UsageRecord._meta.db_table
_FAR_PAST = datetime(1, 1, 1).isoformat() + "+00:00"
# The key columns, as the source's grouped values are named in `keyed`.
_KEY = ("window_start", "window_end", "client_acct_id", "acct_no", "usage_type_code",
        "usage_type", "g1", "g2", "g3", "g4", "rate", "unpriced")
_RECORD_COLUMNS = ("usage_date", "window_end", "client_acct_id", "acct_no", "usage_type_code",
                   "usage_type", "qualifier_1", "qualifier_2", "qualifier_3", "qualifier_4",
                   "rate")


def rule_params(config: AggregationConfig) -> dict:
    """The rule's SQL parameters: the change time and the rule on either side of it."""
    changes_at = config.rule_changes_at
    before = config.rule_at(changes_at - timedelta(microseconds=1)) if changes_at else config.rule
    after = config.rule
    params = {
        "changes_at": connection.ops.adapt_datetimefield_value(changes_at)
        if changes_at else _FAR_PAST,
        "seconds_before": f"{before.frequency_minutes * 60} seconds",
        "seconds_after": f"{after.frequency_minutes * 60} seconds",
    }
    for n in range(1, 5):
        params[f"q{n}_before"] = n in before.qualifiers
        params[f"q{n}_after"] = n in after.qualifiers
    return params


def _keyed(source: str, *, extra: str = "", alias: str = "s") -> str:
    """SELECT the source's events (as `alias`) with their record key: window, grouped
    values, pricing."""
    s = alias
    later = f"{s}.usage_date >= %(changes_at)s::timestamptz"
    seconds = (f"(CASE WHEN {later} THEN %(seconds_after)s ELSE %(seconds_before)s END)"
               "::interval")
    start = f"date_bin({seconds}, {s}.usage_date, timestamptz '1970-01-01 00:00:00+00')"
    grouped = ", ".join(
        f"CASE WHEN (CASE WHEN {later} THEN %(q{n}_after)s ELSE %(q{n}_before)s END) "
        f"THEN {s}.qualifier_{n} ELSE '' END AS g{n}"
        for n in range(1, 5)
    )
    return (
        f"SELECT {extra}{s}.*, {start} AS window_start, {start} + {seconds} AS window_end, "
        f"{grouped}, {s}.amount IS NULL AS unpriced FROM {source}"
    )


def _upsert_records() -> str:
    """CTE `records`: add `keyed`'s sums into the open records; RETURNING their ids by key."""
    key = ", ".join(_KEY)
    return f"""
        sums AS (
            SELECT {key}, SUM(usage_units) AS usage_units, SUM(amount) AS amount,
                   COUNT(*)::integer AS event_count
            FROM keyed GROUP BY {key}
        ), records AS (
            INSERT INTO {_RECORD} AS r (
                batch_id, client_record_id, {", ".join(_RECORD_COLUMNS)}, usage_units, amount,
                event_count, status, sync_error_code, sync_error_message, attempts,
                created_at, updated_at)
            SELECT NULL, NULL, {", ".join(_KEY[:-1])}, usage_units, amount, event_count,
                   'OPEN', '', '', 0, now(), now()
            FROM sums ORDER BY {key}
            ON CONFLICT ({", ".join(_RECORD_COLUMNS)}, (amount IS NULL))
                WHERE batch_id IS NULL
            DO UPDATE SET usage_units = r.usage_units + EXCLUDED.usage_units,
                          amount = r.amount + EXCLUDED.amount,
                          event_count = r.event_count + EXCLUDED.event_count,
                          updated_at = EXCLUDED.updated_at
            RETURNING r.id, {", ".join(f"r.{c}" for c in _RECORD_COLUMNS)},
                      r.amount IS NULL AS unpriced
        )"""


# COALESCE keeps the join hashable where NULL means "not given" (ids and rates are >= 0).
_MATCH = " AND ".join((
    "r.usage_date = k.window_start", "r.window_end = k.window_end",
    "r.client_acct_id = k.client_acct_id",
    "COALESCE(r.acct_no, 0) = COALESCE(k.acct_no, 0)",
    "r.usage_type_code = k.usage_type_code",
    "COALESCE(r.usage_type, 0) = COALESCE(k.usage_type, 0)",
    *(f"r.qualifier_{n} = k.g{n}" for n in range(1, 5)),
    "COALESCE(r.rate, -1) = COALESCE(k.rate, -1)", "r.unpriced = k.unpriced",
))


# Code point order, the order of Python's sorted(): every ingest takes its locks in it.
LOCK_ORDER = 'i.event_id COLLATE "C"'
# How many times a store that deadlocked with a concurrent ingest runs.
ATTEMPTS = 5
_SUMS = "ingest_record_sums"


class _Raced(Exception):
    """A concurrent ingest stored some of the same event_ids after the statement began."""


def store(source: str, params: dict, *, order_by: str = LOCK_ORDER) -> int:
    """Store the source's events not stored yet, each added into its open record; return
    how many were stored.

    `source` is a FROM item with the event COLUMNS, aliased `i` (unnest arrays, a staging
    table), in which an event_id may repeat: the first row in `order_by` order (which must
    start with i.event_id) stands for it. In a savepoint, run again if it deadlocks with a
    concurrent ingest:

    - first, one statement: the sums of the events not stored yet (as its snapshot sees)
      are upserted into their open records, in key order, and the events inserted with
      their record ids. If fewer are inserted than were summed, a concurrent ingest stored
      some of them meanwhile: the sums would count those twice, so the statement is rolled
      back, and
    - then the careful way, three statements: lock the open record of every key (created
      empty where missing), insert the events and keep the sums of the events actually
      inserted (one a concurrent ingest stored first is skipped and counted by nobody), add
      those sums into the still locked records, and delete the records created empty that
      got no event (all duplicates).
    """
    # Read, not load(): an ingest never writes the configuration row (its defaults apply).
    config = AggregationConfig.objects.filter(pk=1).first() or AggregationConfig()
    params = {**params, **rule_params(config)}
    return run_again_on_deadlock(
        lambda: _store_once(source, params, order_by=order_by), attempts=ATTEMPTS, what="ingest"
    )


def _store_once(source: str, params: dict, *, order_by: str) -> int:
    try:
        return _store(_fast_sql(source, order_by=order_by), params, fast=True)
    except _Raced:
        logger.info("ingest raced a concurrent one on the same event ids; storing them the "
                    "careful way")
        return _store(_store_sql(source, order_by=order_by), params, fast=False)


# The planner cannot know how many records the upsert returns: it merge-joins a file's
# million events to them on the 12-column key, sorting both sides, or nested-loops a
# call's thousands through them. A hash join is what suits both.
_HASH_JOINS = {"work_mem": "64MB", "enable_mergejoin": "off", "enable_nestloop": "off"}


@contextmanager
def _planned(cursor, settings: dict[str, str]) -> Iterator[None]:
    """Run the block with these planner settings, then give the caller's back (a block
    that raises leaves them to the savepoint's rollback)."""
    cursor.execute("SELECT " + ", ".join(f"current_setting('{name}')" for name in settings))
    before = dict(zip(settings, cursor.fetchone(), strict=True))
    _set(cursor, settings)
    yield
    _set(cursor, before)


def _set(cursor, settings: dict[str, str]) -> None:
    cursor.execute("SELECT " + ", ".join("set_config(%s, %s, true)" for _ in settings),
                   [value for pair in settings.items() for value in pair])


def _store(statement: str, params: dict, *, fast: bool) -> int:
    with transaction.atomic(), connection.cursor() as cursor:
        if fast:
            with _planned(cursor, _HASH_JOINS):
                cursor.execute(statement, params)
                summed, inserted = cursor.fetchone()
                if summed != inserted:
                    raise _Raced
            return inserted
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_SUMS} (record_id bigint, "
            "usage_units numeric, amount numeric, event_count integer) ON COMMIT DELETE ROWS"
        )
        cursor.execute(f"TRUNCATE {_SUMS}")
        with _planned(cursor, _HASH_JOINS):
            cursor.execute(statement, params)
        cursor.execute(_ADD_SUMS_SQL)
        cursor.execute(_DROP_EMPTY_SQL)
        cursor.execute(f"SELECT COALESCE(SUM(event_count), 0) FROM {_SUMS}")
        return cursor.fetchone()[0]


def _new_events(source: str, *, order_by: str) -> str:
    first = order_by.split(",")[0]
    # OFFSET 0 keeps NOT EXISTS a probe of the event_id index per row. As an anti join, it
    # would be planned from the statistics, which take every staged event_id for a stored
    # one (so a call's events for a handful), or hash the whole events table.
    return f"""
        keyed AS MATERIALIZED (
            SELECT DISTINCT ON ({first}) * FROM ({_keyed(source, alias="i")}
                WHERE NOT EXISTS (
                    SELECT 1 FROM {_EVENT} e WHERE e.event_id = i.event_id OFFSET 0)) i
            ORDER BY {order_by}
        )"""


def _fast_sql(source: str, *, order_by: str) -> str:
    columns = ", ".join(COLUMNS)
    return f"""
        WITH {_new_events(source, order_by=order_by)}, {_upsert_records()}, inserted AS (
            INSERT INTO {_EVENT} ({columns}, received_at, record_id)
            SELECT {", ".join(f"k.{c}" for c in COLUMNS)}, now(), r.id
            FROM keyed k JOIN records r ON {_MATCH}
            ORDER BY k.event_id COLLATE "C"
            ON CONFLICT (event_id) DO NOTHING
            RETURNING 1
        )
        SELECT (SELECT COUNT(*) FROM keyed), (SELECT COUNT(*) FROM inserted)
    """


def _store_sql(source: str, *, order_by: str) -> str:
    columns = ", ".join(COLUMNS)
    key = ", ".join(_KEY)
    return f"""
        WITH {_new_events(source, order_by=order_by)}, records AS (
            INSERT INTO {_RECORD} AS r (
                batch_id, client_record_id, {", ".join(_RECORD_COLUMNS)}, usage_units, amount,
                event_count, status, sync_error_code, sync_error_message, attempts,
                created_at, updated_at)
            SELECT NULL, NULL, {", ".join(_KEY[:-1])}, 0,
                   CASE WHEN unpriced THEN NULL ELSE 0 END, 0, 'OPEN', '', '', 0, now(), now()
            FROM (SELECT DISTINCT {key} FROM keyed) k
            ORDER BY {key}
            ON CONFLICT ({", ".join(_RECORD_COLUMNS)}, (amount IS NULL)) WHERE batch_id IS NULL
            -- A no-op update, to lock the row and return its id.
            DO UPDATE SET updated_at = EXCLUDED.updated_at
            RETURNING r.id, {", ".join(f"r.{c}" for c in _RECORD_COLUMNS)},
                      r.amount IS NULL AS unpriced
        ), inserted AS (
            INSERT INTO {_EVENT} ({columns}, received_at, record_id)
            SELECT {", ".join(f"k.{c}" for c in COLUMNS)}, now(), r.id
            FROM keyed k JOIN records r ON {_MATCH}
            ORDER BY k.event_id COLLATE "C"
            ON CONFLICT (event_id) DO NOTHING
            RETURNING record_id, usage_units, amount
        )
        INSERT INTO {_SUMS} (record_id, usage_units, amount, event_count)
        SELECT r.id, COALESCE(SUM(i.usage_units), 0), SUM(i.amount), COUNT(i.record_id)
        FROM records r LEFT JOIN inserted i ON i.record_id = r.id
        GROUP BY r.id
    """


_ADD_SUMS_SQL = f"""
    UPDATE {_RECORD} r
    SET usage_units = r.usage_units + s.usage_units, amount = r.amount + s.amount,
        event_count = r.event_count + s.event_count, updated_at = now()
    FROM {_SUMS} s
    WHERE r.id = s.record_id AND s.event_count > 0
"""
# Only while still empty: a record that had events before this ingest keeps them.
_DROP_EMPTY_SQL = f"""
    DELETE FROM {_RECORD} r USING {_SUMS} s
    WHERE r.id = s.record_id AND s.event_count = 0 AND r.event_count = 0
      AND r.batch_id IS NULL
"""


def adopt_sql() -> str:
    """Add the events stored without a record (before ingest opened records, or loaded by
    hand) into open records, and link them; answers the events linked."""
    return f"""
        WITH keyed AS MATERIALIZED (
            {_keyed(f"(SELECT * FROM {_EVENT} WHERE record_id IS NULL FOR UPDATE) s",
                    extra="s.id AS event_pk, ")}
        ), {_upsert_records()}, linked AS (
            UPDATE {_EVENT} e SET record_id = r.id
            FROM keyed k JOIN records r ON {_MATCH}
            WHERE e.id = k.event_pk
            RETURNING 1
        )
        SELECT COUNT(*) FROM linked
    """
