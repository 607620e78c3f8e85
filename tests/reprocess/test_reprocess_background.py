"""Reprocess off the request path: a large scope is recorded and answered at once, then
queued chunk by chunk by a task that can run twice, die midway, or never arrive."""

from datetime import timedelta

import pytest
from django.utils import timezone

from allegro.celery import app as celery_app
from reprocess import tasks
from reprocess.models import ReprocessLevel, ReprocessRun, ReprocessRunRecord
from reprocess.reprocess import queue_run, reprocess_run_create
from tests.factories import make_batch
from usage_sync.models import BatchStatus, RecordStatus, SyncActivity, UsageRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def small_chunks(settings):
    """Scopes above 2 records go to the background, 3 records a chunk."""
    settings.REPROCESS_INLINE_RECORDS = 2
    settings.REPROCESS_CHUNK_RECORDS = 3


@pytest.fixture
def sent_tasks(monkeypatch):
    """The run ids handed to the queueing task (its delivery is Celery's business)."""
    sent: list[int] = []
    monkeypatch.setattr(tasks.queue_reprocess_run, "delay", sent.append)
    return sent


def queue_one_chunk(run_id: int) -> None:
    from reprocess.reprocess import _queue_chunk

    _queue_chunk(run_id)


def test_a_large_reprocess_answers_with_the_expected_counts_and_queues_nothing_yet(
    operator, api_client, small_chunks, sent_tasks, published, django_capture_on_commit_callbacks
):
    batches = [make_batch(complete=1, errors={"1009": 2}) for _ in range(3)]
    api_client.force_authenticate(operator)

    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post("/api/v1/reprocess/all/", {"reason": "fixed"}, format="json")

    assert response.status_code == 202
    run = ReprocessRun.objects.get()
    assert response.json() == {"run_id": run.pk, "dry_run": False, "queued": False,
                               "records": 6, "batches": 3}
    assert sent_tasks == [run.pk]
    assert UsageRecord.objects.filter(status=RecordStatus.ERROR).count() == 6
    assert published == []
    progress = api_client.get(f"/api/v1/reprocess/{run.pk}/").json()
    assert (progress["queued"], progress["finished"], progress["records_expected"]) == (
        False, False, 6
    )
    assert [b.id for b in batches] == sorted(b.id for b in batches)


def test_the_task_queues_chunk_by_chunk_and_publishes_each_chunk_after_its_commit(
    operator, small_chunks, sent_tasks, published, django_capture_on_commit_callbacks
):
    one, two, three = (make_batch(complete=1, errors={"1009": 2}) for _ in range(3))
    run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")

    with django_capture_on_commit_callbacks(execute=True):
        queue_one_chunk(run.pk)
    run.refresh_from_db()
    # Batches of 3 records: one a chunk (a chunk never splits a batch).
    assert (run.records_selected, run.batches_selected, run.queue_cursor) == (2, 1, one.id)
    assert not run.is_queued
    assert published == [[one.id]]
    assert not SyncActivity.objects.filter(action_name="REPROCESS").exists()
    run.mark_finished({"pending": 0})
    assert not run.is_finished

    with django_capture_on_commit_callbacks(execute=True):
        tasks.queue_reprocess_run(run.pk)
    run.refresh_from_db()
    assert (run.records_selected, run.batches_selected) == (6, 3)
    assert run.is_queued
    assert published == [[one.id], [two.id], [three.id]]
    assert not UsageRecord.objects.filter(status=RecordStatus.ERROR).exists()
    for batch in (one, two, three):
        batch.refresh_from_db()
        assert (batch.status, batch.pending_count, batch.error_count) == ("PENDING", 2, 0)
    entry = SyncActivity.objects.get(action_name="REPROCESS")
    assert (entry.record_count, entry.details["batch_ids"]) == (6, [one.id, two.id, three.id])


def test_a_second_delivery_of_the_task_queues_nothing_twice(
    operator, small_chunks, sent_tasks, published
):
    make_batch(errors={"1009": 2}, pending=2)
    make_batch(errors={"1017": 3})
    run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")

    queue_run(run.pk)
    queue_run(run.pk)

    assert ReprocessRunRecord.objects.filter(run=run).count() == 7
    run.refresh_from_db()
    assert (run.records_selected, run.batches_selected) == (7, 2)
    assert SyncActivity.objects.filter(action_name="REPROCESS").count() == 1


def test_a_batch_claimed_by_a_sync_between_chunks_is_left_alone(
    operator, small_chunks, sent_tasks, published
):
    free = make_batch(errors={"1009": 3})
    taken = make_batch(errors={"1009": 3})
    run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")
    queue_one_chunk(run.pk)
    # A worker claims the second batch before the next chunk.
    taken.status, taken.sync_started_at = BatchStatus.IN_PROCESS, timezone.now()
    taken.save()

    queue_run(run.pk)

    run.refresh_from_db()
    assert (run.records_selected, run.batches_selected, run.is_queued) == (3, 1, True)
    assert set(taken.records.values_list("status", flat=True)) == {RecordStatus.ERROR}
    assert set(free.records.values_list("status", flat=True)) == {RecordStatus.PENDING}


def test_beat_resumes_a_run_whose_task_never_arrived(
    operator, small_chunks, sent_tasks, published, settings
):
    settings.REPROCESS_RESUME_AFTER_SECONDS = 60
    make_batch(errors={"1009": 3})
    lost = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")
    ReprocessRun.objects.filter(pk=lost.pk).update(
        created_at=timezone.now() - timedelta(seconds=61)
    )
    make_batch(errors={"1017": 3})
    fresh = reprocess_run_create(level=ReprocessLevel.ALL, actor="bob")

    tasks.resume_reprocess_runs()

    lost.refresh_from_db()
    fresh.refresh_from_db()
    assert lost.is_queued and lost.records_selected == 6
    # A run asked for a moment ago is its own task's to queue.
    assert not fresh.is_queued


def test_a_failed_hand_over_to_the_broker_leaves_the_run_for_the_resume(
    operator, small_chunks, monkeypatch, published, django_capture_on_commit_callbacks, caplog
):
    def broker_down(run_id):
        raise ConnectionError("broker down")

    monkeypatch.setattr(tasks.queue_reprocess_run, "delay", broker_down)
    make_batch(errors={"1009": 3})

    with django_capture_on_commit_callbacks(execute=True):
        run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")

    run.refresh_from_db()
    assert not run.is_queued
    assert "the sweep resumes it" in caplog.text


@pytest.fixture
def eager_celery():
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def test_with_eager_celery_the_request_hands_the_run_to_the_task(
    operator, small_chunks, published, django_capture_on_commit_callbacks, eager_celery
):
    make_batch(errors={"1009": 3})

    with django_capture_on_commit_callbacks(execute=True):
        run = reprocess_run_create(level=ReprocessLevel.ALL, actor="alice")

    run.refresh_from_db()
    assert (run.is_queued, run.records_selected) == (True, 3)


def test_a_shell_queues_a_large_scope_itself(small_chunks, sent_tasks, published):
    make_batch(errors={"1009": 3})
    make_batch(errors={"1009": 3})

    run = reprocess_run_create(level=ReprocessLevel.ALL, actor="cli:ops", defer=False)

    assert (run.is_queued, run.records_selected, run.batches_selected) == (True, 6, 2)
    assert sent_tasks == []


def test_the_console_says_a_large_run_is_queueing_in_the_background(
    operator, client, small_chunks, sent_tasks, published
):
    make_batch(errors={"1009": 3})
    client.force_login(operator)

    page = client.get("/usage/reprocess/", {"level": "ALL"})
    assert "queued in the background" in page.content.decode()
    response = client.post("/usage/reprocess/", {"level": "ALL"}, follow=True)

    run = ReprocessRun.objects.get()
    assert "is queueing up to 3 records in 1 batches in the background" in (
        response.content.decode()
    )
    progress = client.get(f"/usage/reprocess/runs/{run.pk}/progress/").content.decode()
    assert "queueing in the background" in progress
