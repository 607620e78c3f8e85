"""Concurrent ingest of overlapping event ids, on PostgreSQL's real locks."""

import threading

import pytest
from django.db import connections, transaction

from tests.factories import event_payload
from tests.services import holding_writes, wait_for, waiting_on_locks
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import UsageEvent

pytestmark = pytest.mark.django_db(transaction=True)


def test_two_calls_with_overlapping_ids_in_opposite_order_queue_instead_of_deadlocking():
    a, _ = validate_events([event_payload(n) for n in (1, 2, 3)])
    b, _ = validate_events([event_payload(n) for n in (3, 2, 1)])
    results, failures = {}, []
    release = threading.Event()

    def hold_the_middle_id():
        # A third writer holds id 2 uncommitted: both calls get that far and wait. Inserted
        # in the order given, A would hold 1 and B 3 by then, each about to need the other's.
        try:
            with transaction.atomic():
                store_events([a[1]])
                release.wait(20)
        finally:
            connections.close_all()

    def store(name, events):
        try:
            results[name] = store_events(events)
        except Exception as exc:  # a deadlock would surface here (a 500 in the API)
            failures.append(repr(exc))
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_middle_id)
    holder.start()
    wait_for(lambda: UsageEvent.objects.count() == 0 and holding_writes() == 1, timeout=10,
             what="the holder's insert")
    threads = [threading.Thread(target=store, args=(name, events))
               for name, events in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    wait_for(lambda: waiting_on_locks() >= 2, timeout=10, what="both calls to wait")
    release.set()
    for thread in [holder, *threads]:
        thread.join(20)

    assert failures == []
    assert sorted(r.created for r in results.values()) == [0, 2]
    assert sorted(r.duplicates for r in results.values()) == [1, 3]
    assert UsageEvent.objects.count() == 3
