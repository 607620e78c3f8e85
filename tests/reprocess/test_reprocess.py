"""reprocess_run_create: levels, guards, dry run, counters, concurrency."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from reprocess.models import ReprocessLevel, ReprocessRun, ReprocessRunRecord
from reprocess.reprocess import ReprocessError, reprocess_run_create
from tests.factories import make_batch
from usage_sync.models import AggregatedBatch, BatchStatus, RecordStatus, SyncActivity, UsageRecord

pytestmark = pytest.mark.django_db


def statuses(batch):
    return dict(
        (s, batch.records.filter(status=s).count()) for s in RecordStatus.values
        if batch.records.filter(status=s).exists()
    )


def assert_counters_match(batch):
    batch.refresh_from_db()
    records = batch.records
    assert batch.pending_count == records.filter(status="PENDING").count()
    assert batch.error_count == records.filter(status="ERROR").count()
    assert batch.completed_count == records.filter(status="COMPLETE").count()
    assert batch.ignored_count == records.filter(status="IGNORED").count()
    assert batch.total_count == records.count()


def test_reprocess_all_queues_every_error_record_and_recounts_their_batches(
    published, django_capture_on_commit_callbacks
):
    one = make_batch(complete=2, errors={"1009": 3})
    two = make_batch(errors={"1004": 2}, ignored=1)
    done = make_batch(complete=4)

    with django_capture_on_commit_callbacks(execute=True):
        run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice", reason="fixed")

    assert (run.records_selected, run.batches_selected) == (5, 2)
    assert statuses(one) == {"COMPLETE": 2, "PENDING": 3}
    assert statuses(two) == {"PENDING": 2, "IGNORED": 1}
    assert not UsageRecord.objects.exclude(status__in=["COMPLETE", "IGNORED"]).exclude(
        sync_error_code=""
    ).exists()
    for batch in (one, two):
        assert_counters_match(batch)
        assert (batch.status, batch.published_at, batch.next_retry_at) == ("PENDING", None, None)
    done.refresh_from_db()
    assert done.published_at is not None
    assert published == [[one.id, two.id]]


def test_the_previous_error_stays_recorded_on_the_run_and_in_the_activity_log(published):
    batch = make_batch(errors={"1009": 2})

    run = reprocess_run_create(
        level=ReprocessLevel.BATCH, batch_id=batch.id, actor="alice", reason="account added"
    )

    links = ReprocessRunRecord.objects.filter(run=run)
    assert set(links.values_list("previous_status", "previous_error_code",
                                 "previous_error_message")) == {("ERROR", "1009", "error 1009")}
    activity = SyncActivity.objects.get(action_name="REPROCESS")
    assert activity.object_name == f"Batch {batch.id}"
    assert (activity.actor, activity.record_count, activity.batch_id) == ("alice", 2, batch.id)
    assert activity.details["reason"] == "account added"
    assert activity.details["scope"] == {"batch": batch.id, "error_code": "", "status": ""}
    assert activity.details["run_id"] == run.pk


def test_batch_level_touches_only_that_batch(published):
    mine = make_batch(complete=1, errors={"1009": 1, "1017": 2})
    other = make_batch(errors={"1009": 2})

    run = reprocess_run_create(level=ReprocessLevel.BATCH, batch_id=mine.id, actor="alice")

    assert (run.records_selected, run.batches_selected) == (3, 1)
    assert statuses(mine) == {"COMPLETE": 1, "PENDING": 3}
    assert statuses(other) == {"ERROR": 2}


def test_error_summary_level_touches_only_that_code_and_status(published):
    batch = make_batch(complete=1, errors={"1009": 2, "1017": 3})

    run = reprocess_run_create(
        level=ReprocessLevel.ERROR_SUMMARY, batch_id=batch.id, error_code="1009",
        status="ERROR", actor="alice",
    )

    assert (run.records_selected, run.batches_selected) == (2, 1)
    assert run.object_name == f"Batch {batch.id} · 1009 · ERROR"
    assert statuses(batch) == {"COMPLETE": 1, "PENDING": 2, "ERROR": 3}
    assert set(batch.records.filter(status="ERROR").values_list("sync_error_code", flat=True)) == {
        "1017"
    }
    assert_counters_match(batch)


def test_stale_pending_records_stay_pending_in_doubt_and_their_batch_is_requeued(published):
    batch = make_batch(errors={"1009": 1}, pending=1, in_doubt=2)
    sent_at = set(batch.records.filter(sent_at__isnull=False).values_list("sent_at", flat=True))

    run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")

    assert run.records_selected == 4
    # In-doubt records keep sent_at: sync_batch reconciles them before anything is re-sent.
    assert set(batch.records.filter(sent_at__isnull=False).values_list("sent_at", flat=True)) == (
        sent_at
    )
    assert batch.records.filter(status="PENDING").count() == 4
    batch.refresh_from_db()
    assert batch.published_at is None


def test_a_pending_summary_group_requeues_its_batch_without_changing_records(published):
    batch = make_batch(complete=1, pending=2)

    run = reprocess_run_create(
        level=ReprocessLevel.ERROR_SUMMARY, batch_id=batch.id, error_code="", status="PENDING",
        actor="alice",
    )

    assert (run.records_selected, run.batches_selected) == (2, 1)
    assert run.object_name == f"Batch {batch.id} · PENDING"
    assert statuses(batch) == {"COMPLETE": 1, "PENDING": 2}


def test_complete_and_ignored_records_are_never_selected(published):
    batch = make_batch(complete=3, ignored=2, errors={"1009": 1})

    reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")
    reprocess_run_create(level=ReprocessLevel.BATCH, batch_id=batch.id, actor="alice")

    assert statuses(batch) == {"COMPLETE": 3, "IGNORED": 2, "PENDING": 1}
    assert not ReprocessRunRecord.objects.filter(
        record__status__in=["COMPLETE", "IGNORED"]
    ).exists()


def test_a_second_request_does_not_queue_records_a_first_one_queued(published):
    batch = make_batch(errors={"1009": 3})

    first = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")
    second = reprocess_run_create(level=ReprocessLevel.BATCH, batch_id=batch.id, actor="bob")

    assert (first.records_selected, second.records_selected) == (3, 0)
    assert second.finished_at is not None


def test_a_batch_in_flight_is_not_touched(published):
    in_flight = make_batch(errors={"1009": 2}, in_doubt=1, in_flight=True)
    idle = make_batch(errors={"1009": 1})

    run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")

    assert (run.records_selected, run.batches_selected) == (1, 1)
    assert statuses(in_flight) == {"ERROR": 2, "PENDING": 1}
    in_flight.refresh_from_db()
    assert in_flight.status == BatchStatus.IN_PROCESS
    with pytest.raises(ReprocessError, match="being synced right now") as raised:
        reprocess_run_create(level=ReprocessLevel.BATCH, batch_id=in_flight.id, actor="alice")
    assert raised.value.kind == "conflict"
    assert statuses(idle) == {"PENDING": 1}


def test_a_batch_with_a_stale_claim_is_reprocessed(published, settings):
    batch = make_batch(errors={"1009": 2}, in_flight=True)
    AggregatedBatch.objects.filter(pk=batch.pk).update(
        sync_started_at=timezone.now() - timedelta(seconds=settings.SYNC_CLAIM_STALE_SECONDS + 1)
    )

    run = reprocess_run_create(level=ReprocessLevel.BATCH, batch_id=batch.id, actor="alice")

    assert run.records_selected == 2
    batch.refresh_from_db()
    assert batch.status == BatchStatus.PENDING


def test_a_dry_run_counts_and_changes_nothing(published, django_capture_on_commit_callbacks):
    batch = make_batch(complete=1, errors={"1009": 2}, pending=1)
    make_batch(errors={"1017": 1})
    before = list(UsageRecord.objects.values_list("id", "status", "sync_error_code", "sent_at"))
    batches_before = list(AggregatedBatch.objects.values())

    with django_capture_on_commit_callbacks(execute=True):
        run = reprocess_run_create(
            level=ReprocessLevel.BATCH, batch_id=batch.id, actor="alice", dry_run=True
        )

    assert run.pk is None
    assert (run.records_expected, run.batches_expected) == (3, 1)
    assert list(UsageRecord.objects.values_list("id", "status", "sync_error_code", "sent_at")) == (
        before
    )
    assert list(AggregatedBatch.objects.values()) == batches_before
    assert not ReprocessRun.objects.exists()
    assert not SyncActivity.objects.exists()
    assert published == []


def test_progress_counts_the_runs_records_by_their_current_status(published):
    batch = make_batch(complete=1, errors={"1009": 3})
    run = reprocess_run_create(level=ReprocessLevel.BATCH, batch_id=batch.id, actor="alice")
    ids = list(run.links.values_list("record_id", flat=True))
    UsageRecord.objects.filter(id=ids[0]).update(status="COMPLETE")
    UsageRecord.objects.filter(id=ids[1]).update(status="ERROR", sync_error_code="1009")

    progress = run.progress()
    run.mark_finished(progress)

    assert progress == {"completed": 1, "errored": 1, "pending": 1, "ignored": 0}
    assert run.finished_at is None
    UsageRecord.objects.filter(id=ids[2]).update(status="COMPLETE")
    run.mark_finished(run.progress())
    assert run.finished_at is not None


@pytest.mark.parametrize(
    ("kwargs", "kind", "message"),
    [
        ({"level": "BATCH", "batch_id": 999_999}, "not_found", "Batch 999999 does not exist."),
        ({"level": "SOME"}, "invalid", "Unknown reprocess level 'SOME'"),
        ({"level": "BATCH"}, "invalid", "needs a batch id"),
        ({"level": "ERROR_SUMMARY", "status": "BOGUS"}, "invalid", "Unknown status 'BOGUS'"),
        ({"level": "ERROR_SUMMARY", "status": "COMPLETE"}, "invalid", "nothing to reprocess"),
        ({"level": "ERROR_SUMMARY", "status": "IGNORED"}, "invalid", "nothing to reprocess"),
        ({"level": "ERROR_SUMMARY", "status": ""}, "invalid", "needs a status"),
        (
            {"level": "ERROR_SUMMARY", "status": "ERROR", "error_code": "1004"},
            "invalid",
            "has no ERROR records with error code '1004'",
        ),
    ],
)
def test_invalid_requests_fail_with_a_clear_message(published, kwargs, kind, message):
    batch = make_batch(complete=1, errors={"1009": 1})
    kwargs = {"batch_id": batch.id, **kwargs} if kwargs["level"] != "BATCH" else kwargs

    with pytest.raises(ReprocessError) as raised:
        reprocess_run_create(actor="alice", **kwargs)

    assert raised.value.kind == kind
    assert message in raised.value.message
    assert not ReprocessRun.objects.exists()
    assert statuses(batch) == {"COMPLETE": 1, "ERROR": 1}


@pytest.mark.django_db(transaction=True)
def test_two_overlapping_requests_at_the_same_moment_queue_each_record_once(published):
    batches = [make_batch(complete=1, errors={"1009": 3, "1017": 2}) for _ in range(4)]
    error_records = UsageRecord.objects.filter(status="ERROR").count()
    barrier = threading.Barrier(2)
    runs, failures = [], []

    def request(**scope):
        try:
            barrier.wait(timeout=10)
            runs.append(reprocess_run_create(actor="operator", **scope))
        except Exception as exc:  # surfaced by the assertion below
            failures.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=request, kwargs={"level": ReprocessLevel.ALL}),
        threading.Thread(
            target=request,
            kwargs={"level": ReprocessLevel.BATCH, "batch_id": batches[2].id},
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert failures == []
    assert sum(run.records_selected for run in runs) == error_records == 20
    assert ReprocessRunRecord.objects.count() == 20
    assert ReprocessRunRecord.objects.values("record").distinct().count() == 20
    assert not UsageRecord.objects.filter(status="ERROR").exists()
    for batch in batches:
        assert_counters_match(batch)
