"""Concurrent file imports of overlapping event ids, on PostgreSQL's real locks."""

import json
import logging
import threading

import pytest
from django.db import connections, transaction

from tests.factories import event_payload
from tests.services import holding_writes, wait_for, waiting_on_locks
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import UsageEvent
from usage_sync.usage_files import UsageFile, UsageFileConflict, import_usage_file

pytestmark = pytest.mark.django_db(transaction=True)


def write_jsonl(path, payloads) -> None:
    path.write_text("".join(json.dumps(payload) + "\n" for payload in payloads))


class Holder(threading.Thread):
    """A third writer that stores events and holds them uncommitted until released."""

    def __init__(self, payloads):
        super().__init__()
        self.events, _ = validate_events(payloads)
        self.release = threading.Event()

    def run(self):
        try:
            with transaction.atomic():
                store_events(self.events)
                self.release.wait(30)
        finally:
            connections.close_all()


def import_in_thread(path, results: dict, name: str) -> threading.Thread:
    def target():
        try:
            with path.open("rb") as source:
                results[name] = import_usage_file(UsageFile(source, format="jsonl"))
        except Exception as exc:  # a deadlock or a conflict surfaces here
            results[name] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_overlapping_files_in_opposite_orders_queue_and_store_each_event_once(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [event_payload(n) for n in range(0, 2000)])
    write_jsonl(tmp_path / "b.jsonl", [event_payload(n) for n in reversed(range(1000, 4000))])
    # The holder keeps id 1500 of the overlap: both imports get that far and wait. Stored in
    # file order, A would hold 1000-1499 and B 1999-1501 by then, each about to need the
    # other's (a deadlock, and a retry).
    holder = Holder([event_payload(1500)])
    holder.start()
    wait_for(lambda: holding_writes() == 1, timeout=10, what="the holder's insert")
    results = {}
    threads = [import_in_thread(tmp_path / f"{name}.jsonl", results, name) for name in "ab"]
    wait_for(lambda: waiting_on_locks() >= 2, timeout=20, what="both imports to wait")
    with caplog.at_level(logging.WARNING, logger="usage_sync.usage_files"):
        holder.release.set()
        for thread in [holder, *threads]:
            thread.join(60)

    assert not [r for r in results.values() if isinstance(r, Exception)], results
    assert "deadlocked" not in caplog.text
    a, b = results["a"], results["b"]
    assert (a.events, b.events) == (2000, 3000)
    assert a.created + b.created == 3999  # the holder stored one
    assert a.duplicates + b.duplicates == 1001
    assert UsageEvent.objects.count() == 4000
    assert UsageEvent.objects.values("event_id").distinct().count() == 4000


def test_a_concurrent_writer_committing_an_id_with_other_content_is_a_conflict(tmp_path):
    write_jsonl(tmp_path / "usage.jsonl", [event_payload(n) for n in range(10)])
    holder = Holder([event_payload(5, usage_units="7")])
    holder.start()
    wait_for(lambda: holding_writes() == 1, timeout=10, what="the holder's insert")
    results = {}
    thread = import_in_thread(tmp_path / "usage.jsonl", results, "import")
    wait_for(lambda: waiting_on_locks() >= 1, timeout=20, what="the import to wait")
    holder.release.set()
    for waiting in (holder, thread):
        waiting.join(60)

    conflict = results["import"]
    assert isinstance(conflict, UsageFileConflict)
    [(line, found)] = conflict.conflicts
    assert (line, found.event_id, found.fields) == (6, "api-00000005", ("usage_units",))
    assert list(UsageEvent.objects.values_list("event_id", flat=True)) == ["api-00000005"]
