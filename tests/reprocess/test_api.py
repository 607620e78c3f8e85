"""The review and reprocess REST API: endpoints, filters, permissions, errors, schema."""

from datetime import UTC, datetime

import pytest
from rest_framework.test import APIClient

from reprocess.models import ReprocessRun
from tests.factories import grant_reprocess, make_batch
from usage_sync.models import AggregatedBatch, SyncActivity, UsageRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(api_client, user):
    grant_reprocess(user)
    return api_client


def ids(response):
    return [row["id"] for row in response.json()["results"]]


def test_batches_are_listed_latest_first_with_their_counts(api_client):
    old = make_batch(complete=2, window_start=datetime(2026, 11, 1, 10, tzinfo=UTC))
    new = make_batch(errors={"1009": 1}, pending=1, window_start=datetime(2026, 11, 2, tzinfo=UTC))

    response = api_client.get("/api/v1/batches/")

    assert response.status_code == 200
    assert ids(response) == [new.id, old.id]
    row = response.json()["results"][0]
    assert {k: row[k] for k in ("total_count", "completed_count", "error_count",
                                "pending_count", "status", "incomplete")} == {
        "total_count": 2, "completed_count": 0, "error_count": 1, "pending_count": 1,
        "status": "PENDING", "incomplete": True,
    }


def test_date_filters_take_batches_on_or_after_start_and_before_end_at_midnight(api_client):
    make_batch(window_start=datetime(2026, 11, 9, 23, tzinfo=UTC))
    first = make_batch(window_start=datetime(2026, 11, 10, 0, tzinfo=UTC))
    last = make_batch(window_start=datetime(2026, 11, 11, 23, tzinfo=UTC))
    make_batch(window_start=datetime(2026, 11, 12, 0, tzinfo=UTC))

    response = api_client.get("/api/v1/batches/?start_date=2026-11-10&end_date=2026-11-12")

    assert ids(response) == [last.id, first.id]


def test_batches_filter_by_incomplete_and_status_and_sort(api_client):
    done = make_batch(complete=3)
    errored = make_batch(errors={"1009": 2})
    pending = make_batch(pending=1, errors={"1009": 3})

    assert ids(api_client.get("/api/v1/batches/?incomplete=true")) == [pending.id, errored.id]
    assert ids(api_client.get("/api/v1/batches/?incomplete=false")) == [done.id]
    assert ids(api_client.get("/api/v1/batches/?status=ERROR")) == [errored.id]
    assert ids(api_client.get("/api/v1/batches/?ordering=-error_count")) == [
        pending.id, errored.id, done.id
    ]
    assert ids(api_client.get("/api/v1/batches/?ordering=id")) == [done.id, errored.id, pending.id]


def test_invalid_filter_values_answer_400_with_a_detail(api_client):
    response = api_client.get("/api/v1/batches/?start_date=yesterday&status=NOPE")

    assert response.status_code == 400
    assert response.json()["detail"] == "Invalid filter value for 'start_date' and 'status'."


def test_one_batch_and_an_unknown_one(api_client):
    batch = make_batch(complete=1)

    assert api_client.get(f"/api/v1/batches/{batch.id}/").json()["id"] == batch.id
    response = api_client.get("/api/v1/batches/999999/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Batch 999999 does not exist."}


def test_the_error_summary_groups_incomplete_records_by_code_and_status(api_client):
    batch = make_batch(complete=5, errors={"1009": 2, "1017": 1}, pending=3, ignored=1)

    response = api_client.get(f"/api/v1/batches/{batch.id}/error-summary/")

    assert response.status_code == 200
    assert response.json() == [
        {"error_code": "1009", "error_message": "error 1009", "status": "ERROR", "count": 2},
        {"error_code": "1017", "error_message": "error 1017", "status": "ERROR", "count": 1},
        {"error_code": "", "error_message": "", "status": "PENDING", "count": 3},
    ]
    assert api_client.get("/api/v1/batches/999999/error-summary/").status_code == 404


def test_records_filter_by_batch_code_status_and_account(api_client):
    batch = make_batch(complete=2, errors={"1009": 2, "1017": 1}, account="NEWCO-001")
    make_batch(errors={"1009": 4})
    UsageRecord.objects.filter(batch=batch, status="COMPLETE").update(
        client_acct_id="", acct_no=4711
    )

    def count(query):
        response = api_client.get(f"/api/v1/records/?{query}")
        assert response.status_code == 200
        return len(response.json()["results"])

    assert count(f"batch={batch.id}") == 5
    assert count(f"batch={batch.id}&error_code=1009&status=ERROR") == 2
    assert count("error_code=1009") == 6
    assert count("account=NEWCO-001") == 3
    assert count("account=4711") == 2
    assert api_client.get("/api/v1/records/?status=MAYBE").status_code == 400


def test_records_come_in_cursor_pages(api_client):
    make_batch(errors={"1009": 5})

    first = api_client.get("/api/v1/records/?page_size=3").json()
    second = api_client.get(first["next"]).json()

    assert len(first["results"]) == 3 and len(second["results"]) == 2
    assert second["next"] is None


def test_the_activity_log_filters_by_status_and_date_and_sorts(api_client):
    a = SyncActivity.objects.create(action_name="BULK_RECORD_USAGE", object_name="Batch 2",
                                    status="ERROR", created_at=datetime(2026, 11, 3, tzinfo=UTC))
    b = SyncActivity.objects.create(action_name="REPROCESS", object_name="All",
                                    status="COMPLETE", created_at=datetime(2026, 11, 4, tzinfo=UTC))

    assert ids(api_client.get("/api/v1/activity/")) == [b.id, a.id]
    assert ids(api_client.get("/api/v1/activity/?status=ERROR")) == [a.id]
    assert ids(api_client.get("/api/v1/activity/?start_date=2026-11-04")) == [b.id]
    assert ids(api_client.get("/api/v1/activity/?end_date=2026-11-04")) == [a.id]
    assert ids(api_client.get("/api/v1/activity/?ordering=object_name")) == [b.id, a.id]
    assert ids(api_client.get("/api/v1/activity/?ordering=-action_name")) == [b.id, a.id]


def test_reprocess_all_answers_202_with_the_run_and_its_counts(operator, user, published):
    make_batch(complete=1, errors={"1009": 2})
    make_batch(errors={"1017": 1})

    response = operator.post("/api/v1/reprocess/all/", {"reason": "accounts fixed"},
                             format="json")

    assert response.status_code == 202
    run = ReprocessRun.objects.get()
    assert response.json() == {"run_id": run.pk, "dry_run": False, "queued": True,
                               "records": 3, "batches": 2}
    assert (run.actor, run.reason, run.level) == (user.username, "accounts fixed", "ALL")


def test_a_dry_run_answers_the_counts_without_a_run(operator, published):
    batch = make_batch(errors={"1009": 2})

    response = operator.post(f"/api/v1/batches/{batch.id}/reprocess/", {"dry_run": True},
                             format="json")

    assert response.status_code == 202
    assert response.json() == {"run_id": None, "dry_run": True, "queued": False,
                               "records": 2, "batches": 1}
    assert not ReprocessRun.objects.exists()
    assert UsageRecord.objects.filter(status="ERROR").count() == 2


def test_error_summary_reprocess_then_its_progress(operator, published):
    batch = make_batch(complete=1, errors={"1009": 2, "1017": 1})

    response = operator.post(f"/api/v1/batches/{batch.id}/error-summary/reprocess/",
                             {"error_code": "1009", "status": "ERROR"}, format="json")

    assert response.status_code == 202
    assert response.json()["records"] == 2
    run_id = response.json()["run_id"]
    progress = operator.get(f"/api/v1/reprocess/{run_id}/").json()
    assert progress["progress"] == {"completed": 0, "errored": 0, "pending": 2, "ignored": 0}
    assert (progress["finished"], progress["finished_at"]) == (False, None)
    assert progress["object_name"] == f"Batch {batch.id} · 1009 · ERROR"
    UsageRecord.objects.filter(batch=batch, status="PENDING").update(status="COMPLETE")
    progress = operator.get(f"/api/v1/reprocess/{run_id}/").json()
    assert progress["progress"]["completed"] == 2
    assert progress["finished"] is True and progress["finished_at"]


@pytest.mark.parametrize(
    ("path", "body", "code", "detail"),
    [
        ("/api/v1/batches/999999/reprocess/", {}, 404, "Batch 999999 does not exist."),
        ("/api/v1/batches/{id}/error-summary/reprocess/", {"status": "WRONG"}, 400,
         "Unknown status 'WRONG'"),
        ("/api/v1/batches/{id}/error-summary/reprocess/", {"status": "COMPLETE"}, 400,
         "nothing to reprocess"),
        ("/api/v1/batches/{id}/error-summary/reprocess/", {"status": "ERROR",
                                                           "error_code": "1004"}, 400,
         "has no ERROR records with error code '1004'"),
        ("/api/v1/batches/{id}/error-summary/reprocess/", {}, 400,
         "Invalid input value for 'status'."),
        ("/api/v1/reprocess/all/", {"dry_run": "perhaps"}, 400,
         "Invalid input value for 'dry_run'."),
    ],
)
def test_invalid_reprocess_requests_answer_with_a_clear_detail(
    operator, published, path, body, code, detail
):
    batch = make_batch(errors={"1009": 1})

    response = operator.post(path.format(id=batch.id), body, format="json")

    assert response.status_code == code
    assert detail in response.json()["detail"]


def test_reprocessing_a_batch_in_flight_answers_409(operator, published):
    batch = make_batch(errors={"1009": 1}, in_flight=True)

    response = operator.post(f"/api/v1/batches/{batch.id}/reprocess/", {}, format="json")

    assert response.status_code == 409
    assert "being synced right now" in response.json()["detail"]


def test_an_unknown_run_is_404(api_client):
    response = api_client.get("/api/v1/reprocess/424242/")

    assert response.status_code == 404
    assert response.json() == {"detail": "Reprocess run 424242 does not exist."}


READS = ["/api/v1/batches/", "/api/v1/batches/{id}/", "/api/v1/batches/{id}/error-summary/",
         "/api/v1/records/", "/api/v1/activity/"]
WRITES = ["/api/v1/reprocess/all/", "/api/v1/batches/{id}/reprocess/",
          "/api/v1/batches/{id}/error-summary/reprocess/"]


@pytest.mark.parametrize("path", READS + WRITES)
def test_anonymous_callers_get_401(db, path):
    batch = make_batch(errors={"1009": 1})
    client = APIClient()
    method = client.post if path in WRITES else client.get

    response = method(path.format(id=batch.id), {}, format="json")

    assert response.status_code == 401
    assert response.json()["detail"]


@pytest.mark.parametrize("path", WRITES)
def test_reprocessing_without_the_permission_is_403(api_client, published, path):
    batch = make_batch(errors={"1009": 1})

    response = api_client.post(path.format(id=batch.id),
                               {"status": "ERROR", "error_code": "1009"}, format="json")

    assert response.status_code == 403
    assert response.json() == {
        "detail": "Reprocessing needs the permission reprocess.reprocess_usage."
    }
    assert UsageRecord.objects.filter(status="ERROR").count() == 1
    assert not AggregatedBatch.objects.filter(published_at__isnull=True).exists()


def test_the_schema_describes_every_endpoint(api_client):
    response = api_client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    paths = response.json()["paths"]
    assert {
        "/api/v1/batches/": {"get"},
        "/api/v1/batches/{batch_id}/": {"get"},
        "/api/v1/batches/{batch_id}/error-summary/": {"get"},
        "/api/v1/batches/{batch_id}/reprocess/": {"post"},
        "/api/v1/batches/{batch_id}/error-summary/reprocess/": {"post"},
        "/api/v1/records/": {"get"},
        "/api/v1/activity/": {"get"},
        "/api/v1/reprocess/all/": {"post"},
        "/api/v1/reprocess/{run_id}/": {"get"},
    }.items() <= {path: set(ops) for path, ops in paths.items()}.items()
    batch_params = {p["name"] for p in paths["/api/v1/batches/"]["get"]["parameters"]}
    assert {"start_date", "end_date", "status", "incomplete", "ordering", "page"} <= batch_params
    record_params = {p["name"] for p in paths["/api/v1/records/"]["get"]["parameters"]}
    assert {"batch", "error_code", "status", "account", "cursor"} <= record_params


@pytest.mark.parametrize(
    "ordering, key",
    [
        ("completed_count", lambda b: (b.completed_count, b.id)),
        ("-error_count", lambda b: (-b.error_count, b.id)),
        # An empty choice keeps the default order: latest window first.
        (",", lambda b: (-b.window_start.timestamp(), -b.sequence)),
    ],
)
def test_batch_pages_have_a_stable_order_whatever_the_sort(operator, ordering, key):
    # Ties are broken by id, so a batch never appears on two pages or on none.
    for n in range(5):
        make_batch(complete=1, errors={"1009": n % 2})
    # An UPDATE moves the first batch's row to the end of the table: without the
    # tie-break a scan would return it last among its equals.
    first = AggregatedBatch.objects.order_by("id").first()
    AggregatedBatch.objects.filter(pk=first.pk).update(updated_at=first.updated_at)
    seen = []
    url = f"/api/v1/batches/?ordering={ordering}&page_size=2"
    while url:
        body = operator.get(url).json()
        seen += [b["id"] for b in body["results"]]
        url = body["next"]
    assert seen == [b.id for b in sorted(AggregatedBatch.objects.all(), key=key)]
