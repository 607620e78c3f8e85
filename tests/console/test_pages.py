"""Console pages: login, navigation, incomplete batches, summary, reprocess."""

import csv
import io
from datetime import UTC, datetime

import pytest
from django.test import Client
from django.urls import reverse

from reprocess.models import ReprocessRun
from tests.factories import UserFactory, grant_reprocess, make_batch
from usage_sync.models import RecordStatus, UsageRecord

pytestmark = pytest.mark.django_db

PAGES = ["console:overview", "console:batches", "console:records", "console:activity",
         "console:config", "console:accounts"]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_sends_anonymous_visitors_to_the_login(name):
    response = Client().get(reverse(name))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_login_page_logs_a_user_in():
    UserFactory(username="ops")
    client = Client(enforce_csrf_checks=False)
    assert client.get(reverse("login")).status_code == 200
    response = client.post(reverse("login"),
                           {"username": "ops", "password": "correct horse battery"})
    assert response.status_code == 302
    assert response["Location"] == reverse("console:overview")


def test_logout_is_a_post_with_csrf(operator):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    assert client.post(reverse("logout")).status_code == 403
    page = client.get(reverse("console:overview"))
    assert b'action="/logout/"' in page.content
    token = page.cookies["csrftoken"].value
    assert client.post(reverse("logout"), {"csrfmiddlewaretoken": token}).status_code == 302


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders(client, name):
    make_batch(complete=1, errors={"1009": 1})
    assert client.get(reverse(name)).status_code == 200


def test_the_toggle_switches_the_navigation_pane(client):
    usage = client.get(reverse("console:batches")).content.decode()
    assert "Billing Aggregated Usage Records" in usage
    assert "Aggregate usage configuration" in usage
    assert reverse("console:accounts") in usage  # the Account side of the toggle
    account = client.get(reverse("console:accounts")).content.decode()
    assert 'data-section="account"' in account
    assert "Billing Aggregated Usage Records" not in account
    assert "Activity log" not in account


def test_the_batch_view_lists_only_incomplete_batches_with_their_counters(client):
    done = make_batch(complete=3)
    failed = make_batch(complete=2, errors={"1009": 3}, pending=1)
    table = client.get(reverse("console:batches")).context["table"]
    rows = {row.record.pk: row for row in table.rows}
    assert set(rows) == {failed.pk}
    cells = [str(rows[failed.pk].get_cell(c)) for c in
             ("total_count", "completed_count", "error_count", "pending_count")]
    assert cells == ["6", "2", "3", "1"]
    assert done.pk not in rows


def test_the_batch_view_lists_the_latest_first(client):
    older = make_batch(errors={"1": 1}, window_start=datetime(2026, 11, 1, tzinfo=UTC))
    newer = make_batch(errors={"1": 1}, window_start=datetime(2026, 11, 2, tzinfo=UTC))
    table = client.get(reverse("console:batches")).context["table"]
    assert [row.record.pk for row in table.rows] == [newer.pk, older.pk]
    asc = client.get(reverse("console:batches"), {"sort": "window_start"}).context["table"]
    assert [row.record.pk for row in asc.rows] == [older.pk, newer.pk]


def test_the_date_filters_include_the_start_day_and_exclude_the_end_day(client, settings):
    settings.TIME_ZONE = "UTC"
    day1 = make_batch(errors={"1": 1}, window_start=datetime(2026, 11, 1, 0, 0, tzinfo=UTC))
    day2 = make_batch(errors={"1": 1}, window_start=datetime(2026, 11, 2, 23, 0, tzinfo=UTC))
    day3 = make_batch(errors={"1": 1}, window_start=datetime(2026, 11, 3, 0, 0, tzinfo=UTC))

    def listed(**params):
        table = client.get(reverse("console:batches"), params).context["table"]
        return {row.record.pk for row in table.rows}

    assert listed(start_date="2026-11-02") == {day2.pk, day3.pk}
    assert listed(end_date="2026-11-03") == {day1.pk, day2.pk}
    assert listed(start_date="2026-11-01", end_date="2026-11-02") == {day1.pk}


def test_the_status_filter_is_exact(client):
    failed = make_batch(errors={"1": 1})
    pending = make_batch(pending=2)
    table = client.get(reverse("console:batches"), {"status": failed.status}).context["table"]
    assert {row.record.pk for row in table.rows} == {failed.pk}
    assert failed.status != pending.status


def test_the_summary_lists_error_code_and_status_lines_with_links(client):
    batch = make_batch(complete=1, errors={"1009": 2, "5001": 1}, pending=1)
    response = client.get(reverse("console:batch-summary", args=[batch.pk]), {"fragment": "1"})
    lines = response.context["lines"]
    assert [(line["status"], line["error_code"], line["count"]) for line in lines] == [
        ("ERROR", "1009", 2), ("ERROR", "5001", 1), ("PENDING", "", 1)]
    html = response.content.decode()
    assert f"/usage/records/?batch={batch.pk}&amp;error_code=1009&amp;status=ERROR" in html
    assert "level=ERROR_SUMMARY" in html
    assert "View records" in html


def test_the_expand_icon_is_a_link_to_the_batch_page_and_the_script_gets_the_fragment(client):
    batch = make_batch(errors={"1009": 2})
    listing = client.get(reverse("console:batches")).content.decode()
    batch_url = reverse("console:batch", args=[batch.pk])
    summary_url = reverse("console:batch-summary", args=[batch.pk])
    assert (f'class="icon-btn js-expand" href="{batch_url}#summary" '
            f'data-fragment="{summary_url}?fragment=1"') in listing

    page = client.get(summary_url, follow=True).content.decode()
    fragment = client.get(summary_url, {"fragment": "1"}).content.decode()

    # Without JavaScript the link opens a whole console page; the script asks for the row.
    assert "<html" in page and f"Batch {batch.pk}" in page and "1009" in page
    assert "<html" not in fragment and "1009" in fragment


def test_the_confirmation_shows_the_dry_run_counts(client):
    batch = make_batch(complete=1, errors={"1009": 2}, pending=1)
    make_batch(errors={"1": 4})
    response = client.get(reverse("console:reprocess"), {"level": "BATCH", "batch": batch.pk})
    assert response.context["dry_run"].records_expected == 3
    assert response.context["dry_run"].batches_expected == 1
    everything = client.get(reverse("console:reprocess"), {"level": "ALL"})
    assert everything.context["dry_run"].records_expected == 7
    assert everything.context["dry_run"].batches_expected == 2
    assert UsageRecord.objects.filter(status=RecordStatus.ERROR).count() == 6


def test_confirming_queues_the_records_and_shows_the_run(
    operator, published, django_capture_on_commit_callbacks
):
    batch = make_batch(complete=1, errors={"1009": 2, "5001": 1})
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    page = client.get(reverse("console:reprocess"), {
        "level": "ERROR_SUMMARY", "batch": batch.pk, "error_code": "1009", "status": "ERROR"})
    token = page.cookies["csrftoken"].value
    data = {"level": "ERROR_SUMMARY", "batch": batch.pk, "error_code": "1009",
            "status": "ERROR", "reason": "fixed the plan"}
    assert client.post(reverse("console:reprocess"), data).status_code == 403  # no CSRF
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("console:reprocess"),
                               {**data, "csrfmiddlewaretoken": token}, follow=True)
    run = ReprocessRun.objects.get()
    assert (run.records_selected, run.reason, run.actor) == (2, "fixed the plan",
                                                             operator.username)
    statuses = sorted(batch.records.values_list("status", "sync_error_code"))
    assert statuses == [("COMPLETE", ""), ("ERROR", "5001"), ("PENDING", ""), ("PENDING", "")]
    assert published == [[batch.pk]]
    html = response.content.decode()
    assert f"Reprocess run {run.pk}" in html
    assert "queued 2 records in 1 batches" in html
    progress = client.get(reverse("console:run-progress", args=[run.pk]))
    assert progress.context["progress"]["pending"] == 2


def test_a_reprocess_error_is_shown_clearly(client):
    batch = make_batch(complete=1, errors={"1009": 1})
    response = client.get(reverse("console:reprocess"), {
        "level": "ERROR_SUMMARY", "batch": batch.pk, "status": "COMPLETE"})
    assert response.status_code == 400
    assert "nothing to reprocess" in response.content.decode()
    posted = client.post(reverse("console:reprocess"), {"level": "BATCH", "batch": 999999},
                         follow=True)
    assert "Reprocess not started: Batch 999999 does not exist." in posted.content.decode()


def test_users_without_the_permission_see_no_buttons_and_get_403(viewer_client):
    batch = make_batch(errors={"1009": 2})
    page = viewer_client.get(reverse("console:batches")).content.decode()
    summary_url = reverse("console:batch-summary", args=[batch.pk])
    fragment = viewer_client.get(summary_url, {"fragment": "1"}).content.decode()
    summary_page = viewer_client.get(summary_url, follow=True).content.decode()
    assert "Reprocess" not in page.replace("Billing Sync Reprocess", "")
    assert "btn" not in fragment
    assert "Reprocess" not in summary_page.replace("Billing Sync Reprocess", "")
    assert viewer_client.get(reverse("console:reprocess"), {"level": "ALL"}).status_code == 403
    response = viewer_client.post(reverse("console:reprocess"), {"level": "ALL"})
    assert response.status_code == 403
    assert UsageRecord.objects.filter(status=RecordStatus.ERROR).count() == 2


def test_the_records_view_filters_and_exports_csv(client):
    batch = make_batch(complete=2, errors={"1009": 1}, account="ACME-9")
    make_batch(errors={"1009": 5}, account="OTHER")
    params = {"batch": batch.pk, "error_code": "1009", "status": "ERROR"}
    table = client.get(reverse("console:records"), params).context["table"]
    assert [row.record.client_record_id for row in table.rows] == [f"AU{batch.pk}-2"]
    by_account = client.get(reverse("console:records"), {"account": "ACME-9"}).context["table"]
    assert len(list(by_account.rows)) == 3
    response = client.get(reverse("console:records-csv"), params)
    body = b"".join(response.streaming_content).decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [(r["client_record_id"], r["status"], r["sync_error_code"]) for r in rows] == [
        (f"AU{batch.pk}-2", "ERROR", "1009")]


def test_granting_the_permission_is_what_shows_the_buttons(viewer_client):
    make_batch(errors={"1009": 1})
    user = viewer_client.get(reverse("console:batches")).context["user"]
    grant_reprocess(user)
    page = viewer_client.get(reverse("console:batches")).content.decode()
    assert "Reprocess all" in page


def test_the_records_view_filters_by_usage_date(client, settings):
    settings.TIME_ZONE = "UTC"
    early = make_batch(complete=1, window_start=datetime(2026, 10, 1, tzinfo=UTC))
    late = make_batch(complete=1, window_start=datetime(2026, 10, 2, 5, tzinfo=UTC))

    def listed(**params):
        table = client.get(reverse("console:records"), params).context["table"]
        return {row.record.batch_id for row in table.rows}

    assert listed(start_date="2026-10-02") == {late.pk}
    assert listed(start_date="2026-10-01", end_date="2026-10-02") == {early.pk}
    csv_body = b"".join(client.get(reverse("console:records-csv"),
                                   {"end_date": "2026-10-02"}).streaming_content).decode()
    assert f"AU{early.pk}-0" in csv_body and f"AU{late.pk}-0" not in csv_body


def test_the_records_view_never_counts_the_whole_table(client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    make_batch(complete=3)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("console:records"), {"page": 1})
    assert response.status_code == 200
    record_table = UsageRecord._meta.db_table
    assert not [q["sql"] for q in queries
                if "COUNT(" in q["sql"].upper() and record_table in q["sql"]]


def test_the_progress_fragment_says_done_once_nothing_is_pending(client, published):
    batch = make_batch(errors={"1009": 2})
    response = client.post(reverse("console:reprocess"), {"level": "BATCH", "batch": batch.pk})
    run = ReprocessRun.objects.get()
    assert response["Location"] == reverse("console:batches") + f"?run={run.pk}"
    running = client.get(reverse("console:run-progress", args=[run.pk])).content.decode()
    assert 'data-finished="0"' in running and "2 pending" in running
    batch.records.update(status=RecordStatus.COMPLETE)
    done = client.get(reverse("console:run-progress", args=[run.pk])).content.decode()
    assert 'data-finished="1"' in done and "2 completed" in done
    run.refresh_from_db()
    assert run.finished_at is not None


def test_a_forbidden_reprocess_explains_the_missing_permission(viewer_client):
    response = viewer_client.post(reverse("console:reprocess"), {"level": "ALL"})
    assert response.status_code == 403
    assert "Not allowed" in response.content.decode()


def test_fragments_and_exports_need_a_login_too():
    batch = make_batch(errors={"1009": 1})
    for url in (reverse("console:batch-summary", args=[batch.pk]),
                reverse("console:run-progress", args=[1]),
                reverse("console:records-csv"),
                reverse("console:reprocess") + "?level=ALL"):
        response = Client().get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login"))
    assert Client().post(reverse("console:reprocess"), {"level": "ALL"}).status_code == 302
    assert UsageRecord.objects.get().status == RecordStatus.ERROR


@pytest.mark.parametrize(("url", "table"), [
    ("console:records", "RecordTable"), ("console:batches", "BatchTable"),
])
def test_the_written_out_rows_have_a_cell_under_each_column_header(operator, url, table):
    # The record and batch tables write their rows out field by field (for speed): a
    # column added to the Table without its cell in the template would shift the others.
    import re

    from reprocess import tables

    make_batch(complete=1, errors={"1009": 1}, pending=1)
    client = Client()
    client.force_login(operator)
    html = client.get(reverse(url)).content.decode()
    body = html[html.index("<tbody"):html.index("</tbody>")]
    rows = re.findall(r"<tr.*?</tr>", body, re.S)
    columns = len(getattr(tables, table).base_columns)
    assert rows and all(row.count("<td") == columns for row in rows)
    assert html.count("<th") - html.count("<thead") == columns
