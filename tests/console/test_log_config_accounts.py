"""Console pages: activity log, configuration, accounts, overview."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.factories import UserFactory, make_batch
from usage_sync.models import AggregationConfig, SyncActivity

pytestmark = pytest.mark.django_db


def activity(**fields):
    defaults = {"action_name": "BULK_RECORD_USAGE", "object_name": "Batch 1",
                "status": SyncActivity.Status.COMPLETE}
    return SyncActivity.objects.create(**{**defaults, **fields})


def test_the_activity_log_sorts_by_id_status_action_and_object(client):
    a = activity(action_name="REPROCESS", object_name="All", status="ERROR")
    b = activity(action_name="AGGREGATE", object_name="Window", status="COMPLETE")

    def order(sort):
        table = client.get(reverse("console:activity"), {"sort": sort}).context["table"]
        return [row.record.pk for row in table.rows]

    assert order("") == [b.pk, a.pk]  # latest first
    assert order("id") == [a.pk, b.pk]
    assert order("status") == [b.pk, a.pk]
    assert order("action_name") == [b.pk, a.pk]
    assert order("-object_name") == [b.pk, a.pk]


def test_the_activity_log_filters_by_status_and_shows_details(client):
    activity(status="ERROR", details={"sent": {"records": 3}}, actor="ops", record_count=3,
             duration_ms=120, error_code="5001", error_message="Aria timed out")
    activity(status="COMPLETE")
    response = client.get(reverse("console:activity"), {"status": "ERROR"})
    assert len(list(response.context["table"].rows)) == 1
    html = response.content.decode()
    assert "<details>" in html and "&quot;records&quot;: 3" in html
    assert ">ops<" in html and ">120 ms<" in html
    assert "error: 5001 Aria timed out" in html


def test_the_activity_log_filters_by_date(client):
    old = activity()
    SyncActivity.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    new = activity()
    since = (timezone.localdate() - timedelta(days=1)).isoformat()
    table = client.get(reverse("console:activity"), {"start_date": since}).context["table"]
    assert [row.record.pk for row in table.rows] == [new.pk]


CONFIG = {"frequency_minutes": 15, "group_by_qualifier_1": "on", "batch_size": 500,
          "lateness_grace_minutes": 5, "enabled": "on"}


def config_client():
    user = UserFactory()
    user.user_permissions.add(Permission.objects.get(codename="change_aggregationconfig"))
    client = Client()
    client.force_login(user)
    return client, user


def test_saving_the_configuration_logs_the_changes():
    client, user = config_client()
    AggregationConfig.load()
    response = client.post(reverse("console:config"), CONFIG)
    assert response.status_code == 302
    config = AggregationConfig.load()
    assert (config.frequency_minutes, config.batch_size, config.group_by_qualifier_1) == (
        15, 500, True)
    entry = SyncActivity.objects.get(action_name="CONFIG_CHANGE")
    assert entry.actor == user.username
    assert entry.details["changes"]["batch_size"] == {"old": 1000, "new": 500}
    assert entry.details["changes"]["frequency_minutes"] == {"old": 60, "new": 15}
    assert set(entry.details["changes"]) == {"batch_size", "frequency_minutes",
                                             "group_by_qualifier_1"}


def test_a_new_frequency_or_grouping_applies_from_the_next_window_and_says_when():
    client, _ = config_client()
    AggregationConfig.load()
    before = timezone.now()

    response = client.post(reverse("console:config"), CONFIG, follow=True)

    config = AggregationConfig.load()
    # Hourly to every 15 minutes: from the next full hour, the longer of the two windows.
    assert config.rule_changes_at > before
    assert config.rule_changes_at.minute == config.rule_changes_at.second == 0
    assert config.previous_rule == {"frequency_minutes": 60, "qualifiers": []}
    assert config.rule_at(before).frequency_minutes == 60
    page = response.content.decode()
    assert "apply from the next window on, at" in page
    assert 'id="rule-change"' in page and "grouped hourly by account and usage type" in page
    entry = SyncActivity.objects.get(action_name="CONFIG_CHANGE")
    assert entry.details["rule_applies_from"] == config.rule_changes_at.isoformat()


def test_the_configuration_form_explains_invalid_values():
    client, _ = config_client()
    response = client.post(reverse("console:config"), {**CONFIG, "batch_size": 0,
                                                        "frequency_minutes": 7})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert "batch_size" in errors and "frequency_minutes" in errors
    assert "Ensure this value is greater than or equal to 1." in response.content.decode()
    assert not SyncActivity.objects.filter(action_name="CONFIG_CHANGE").exists()


def test_the_configuration_is_read_only_without_the_permission(client):
    page = client.get(reverse("console:config"))
    assert "Read only" in page.content.decode()
    assert all(field.field.disabled for field in page.context["form"])
    assert client.post(reverse("console:config"), CONFIG).status_code == 403
    assert AggregationConfig.load().batch_size == 1000


def test_the_accounts_view_counts_records_by_status(client):
    make_batch(complete=2, errors={"1009": 1}, pending=1, account="ACME-1")
    make_batch(complete=1, account="ZETA-2")
    table = client.get(reverse("console:accounts")).context["table"]
    rows = {row.record["client_acct_id"]: row.record for row in table.rows}
    acme = rows["ACME-1"]
    assert (acme["total"], acme["complete"], acme["error"], acme["pending"]) == (4, 2, 1, 1)
    assert rows["ZETA-2"]["total"] == 1
    html = client.get(reverse("console:accounts"), {"q": "acme"}).content.decode()
    assert "/usage/records/?account=ACME-1" in html and "ZETA-2" not in html


def test_the_overview_counts_and_charts_sync_outcomes(client):
    make_batch(complete=2, errors={"1009": 1})
    activity(status="COMPLETE")
    activity(status="ERROR")
    response = client.get(reverse("console:overview"))
    assert response.context["record_counts"]["error"] == 1
    assert response.context["record_counts"]["complete"] == 2
    assert response.context["incomplete_batches"] == 1
    html = response.content.decode()
    assert "<svg" in html and 'class="seg seg-complete"' in html and "seg-error" in html


def test_saving_the_configuration_needs_the_csrf_token():
    _, user = config_client()
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(reverse("console:config"), CONFIG).status_code == 403
    token = client.get(reverse("console:config")).cookies["csrftoken"].value
    response = client.post(reverse("console:config"), {**CONFIG, "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert AggregationConfig.load().batch_size == 500
