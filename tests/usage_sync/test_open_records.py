"""Open records: ingest adds each event into its window's open record; the money invariants
hold under parallel ingest; a change of frequency or grouping applies from the next window."""

import json
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction
from django.db.models import Sum

from usage_sync.aggregation import aggregate_usage
from usage_sync.ingest import COPY_FROM_EVENTS, store_events, validate_events
from usage_sync.models import AggregationConfig, GroupingRule, UsageEvent, UsageRecord
from usage_sync.reconcile import reconcile

DAY = datetime(2026, 11, 20, tzinfo=UTC)


def at(hour: int, minute: int = 0) -> datetime:
    return DAY + timedelta(hours=hour, minutes=minute)


def usage(event_id: str, when: datetime, units: str = "1", account: str = "A", **more) -> dict:
    return {"event_id": event_id, "client_acct_id": account, "usage_type_code": "API_CALLS",
            "usage_units": units, "usage_date": when.isoformat(), **more}


def store(*raw: dict):
    events, errors = validate_events(list(raw))
    assert not errors
    return store_events(events)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("request_size", [40, COPY_FROM_EVENTS + 50], ids=["arrays", "copied"])
def test_parallel_clients_sending_the_same_keys_and_ids_bill_each_event_once(request_size):
    # 600 events over 4 accounts, 2 hours, priced and unpriced: few keys, all hot. Four
    # clients each send all of them, shuffled, in requests of `request_size`: every key
    # and every event_id is contended, and each client re-sends what the others stored.
    rng = random.Random(7)
    raw = [
        usage(f"e{n}", at(9 + n % 2, n % 60), units=f"{n % 7 + 1}.25",
              account=f"ACCT-{n % 4}", **({"amount": f"{n % 5}.10"} if n % 3 == 0 else {}))
        for n in range(600)
    ]
    created, failures = [], []

    def client(seed: int) -> None:
        mine = raw[:]
        random.Random(seed).shuffle(mine)
        try:
            for start in range(0, len(mine), request_size):
                created.append(store(*mine[start:start + request_size]).created)
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert failures == []
    assert sum(created) == UsageEvent.objects.count() == 600
    expected = sum(Decimal(e["usage_units"]) for e in raw)
    assert UsageRecord.objects.aggregate(units=Sum("usage_units"))["units"] == expected
    assert UsageRecord.objects.aggregate(n=Sum("event_count"))["n"] == 600
    # One open record per key: 4 accounts (each in one hour) × priced or not.
    assert UsageRecord.objects.filter(status="OPEN").count() == 8
    result = aggregate_usage(now=at(12))
    assert (result.events, result.records) == (600, 8)
    report = reconcile(check_aria=False)
    assert report.ok, report.problems


@pytest.mark.django_db
@pytest.mark.parametrize("count", [1, COPY_FROM_EVENTS], ids=["arrays", "copied"])
def test_storing_leaves_the_callers_planner_settings_as_they_were(count):
    query = ("SELECT current_setting('enable_nestloop'), current_setting('enable_mergejoin'), "
             "current_setting('work_mem')")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '5MB'")
        cursor.execute(query)
        before = cursor.fetchone()

        store(*(usage(f"e{n}", at(9, n % 60)) for n in range(count)))

        cursor.execute(query)
        assert cursor.fetchone() == before == ("on", "on", "5MB")


@pytest.mark.django_db
def test_a_call_into_more_stored_events_than_it_holds_is_planned_without_nested_loops():
    # The statistics take every event_id of a call for a stored one once the table holds
    # more: planned from them, the call's events were joined to their records in a nested
    # loop, quadratic in the call's size (seconds for 5,000).
    store(*(usage(f"old{n}", at(9, n % 60), account=f"A{n % 50}") for n in range(600)))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE usage_sync_usageevent, usage_sync_usagerecord")
    plans = []

    def explain(execute, sql, params, many, context):
        if "keyed AS MATERIALIZED" in sql:
            with connection.connection.cursor() as raw:
                raw.execute("EXPLAIN (FORMAT JSON) " + sql.replace("%%", "%"), params)
                plans.append(raw.fetchone()[0])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explain):
        created = store(*(usage(f"new{n}", at(9, n % 60), account=f"A{n % 50}")
                          for n in range(COPY_FROM_EVENTS))).created

    assert created == COPY_FROM_EVENTS
    assert len(plans) == 1
    plan = json.dumps(plans)
    assert "Nested Loop" not in plan
    # NOT EXISTS is a probe per row, never a join over the whole events table.
    assert '"Join Type": "Anti"' not in plan and '"SubPlan 1"' in plan


@pytest.mark.django_db
def test_a_new_frequency_applies_from_the_next_window_of_the_longer_one():
    config = AggregationConfig.load()
    in_force = config.rule_at(at(10, 30))
    config.frequency_minutes = AggregationConfig.Frequency.DAILY
    config.edited(in_force=in_force, now=at(10, 30))
    config.save()
    assert (config.rule_changes_at, config.previous_rule) == (
        DAY + timedelta(days=1), {"frequency_minutes": 60, "qualifiers": []}
    )

    store(usage("today", at(10, 45)), usage("tomorrow", at(24 + 15)))

    today, tomorrow = (UsageEvent.objects.get(event_id=e).record for e in ("today", "tomorrow"))
    assert (today.usage_date, today.window_end) == (at(10), at(11))
    assert (tomorrow.usage_date, tomorrow.window_end) == (at(24), at(48))


@pytest.mark.django_db
def test_a_grouping_change_waits_for_the_next_window_and_an_edit_back_cancels_it():
    config = AggregationConfig.load()
    in_force = config.rule_at(at(10, 30))
    config.group_by_qualifier_1 = True
    config.edited(in_force=in_force, now=at(10, 30))
    config.save()
    assert config.rule_changes_at == at(11)

    store(usage("now-eu", at(10, 40), qualifier_1="eu"), usage("now-us", at(10, 41),
          qualifier_1="us"), usage("next-eu", at(11, 5), qualifier_1="eu"),
          usage("next-us", at(11, 6), qualifier_1="us"))

    # 10:00 keeps one record for both regions; from 11:00 each region has its own.
    assert sorted(UsageRecord.objects.values_list("usage_date", "qualifier_1")) == [
        (at(10), ""), (at(11), "eu"), (at(11), "us")
    ]
    config.group_by_qualifier_1 = False
    config.edited(in_force=config.rule_at(at(10, 50)), now=at(10, 50))
    assert (config.rule_changes_at, config.previous_rule) == (None, {})
    assert config.rule_at(at(12)) == GroupingRule(60, ())


@pytest.mark.django_db
def test_runs_stay_due_at_the_shorter_frequency_while_a_change_waits_and_after():
    config = AggregationConfig.load()
    config.last_run_at = at(10)
    in_force = config.rule_at(at(10, 30))
    config.frequency_minutes = AggregationConfig.Frequency.DAILY
    config.edited(in_force=in_force, now=at(10, 30))
    config.save()

    # The hourly windows until midnight still close every hour, and so does the last one.
    assert config.is_due(at(11, 1))
    assert config.is_due(at(24, 6))


@pytest.mark.django_db
def test_a_run_that_deadlocks_with_an_ingest_starts_again(monkeypatch):
    from django.db import OperationalError

    from usage_sync import aggregation

    class Deadlock(Exception):
        sqlstate = "40P01"

    real, calls = aggregation._aggregate_once, []

    def deadlock_once(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("deadlock detected") from Deadlock()
        return real(**kwargs)

    monkeypatch.setattr(aggregation, "_aggregate_once", deadlock_once)
    store(usage("e1", at(9, 15)))

    result = aggregate_usage(now=at(12))

    assert (len(calls), result.events, result.records) == (2, 1, 1)
