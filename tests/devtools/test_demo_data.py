import io

import pytest
from django.core.management import call_command

from usage_sync.models import UsageEvent, UsageRecord


def load_demo_data(*args) -> str:
    out = io.StringIO()
    call_command("load_demo_data", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_it_loads_events_for_known_and_unknown_accounts_and_aggregates_them():
    output = load_demo_data()

    events = UsageEvent.objects.filter(event_id__startswith="demo-")
    assert events.count() == 3000
    unknown = events.filter(client_acct_id__startswith="UNKNOWN-").count()
    assert 150 < unknown < 450  # About a tenth.
    assert events.values("client_acct_id").distinct().count() >= 8
    assert events.values("usage_type_code").distinct().count() == 4
    assert events.exclude(qualifier_1="").exists()
    assert events.filter(amount__isnull=False).exists()
    # Two days of events: all but the still-open latest window are aggregated at once.
    aggregated = events.filter(record__batch__isnull=False).count()
    assert aggregated > 2700
    assert UsageRecord.objects.filter(client_acct_id__startswith="UNKNOWN-").exists()
    assert f"aggregated {aggregated} events" in output


@pytest.mark.django_db
def test_a_second_run_is_a_no_op():
    load_demo_data()
    events = set(UsageEvent.objects.values_list("event_id", "usage_date", "record_id"))
    records = UsageRecord.objects.count()

    output = load_demo_data()

    assert set(UsageEvent.objects.values_list("event_id", "usage_date", "record_id")) == events
    assert UsageRecord.objects.count() == records
    assert "already loaded (3000 events)" in output


@pytest.mark.django_db
def test_force_loads_another_set_with_new_event_ids():
    load_demo_data("--count", "10")

    load_demo_data("--count", "5", "--force")

    assert sorted(UsageEvent.objects.values_list("event_id", flat=True)) == [
        f"demo-{n:06d}" for n in range(1, 16)
    ]
