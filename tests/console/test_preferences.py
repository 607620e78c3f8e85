"""Each user's time zone: the console's pages and CSV follow it, the API stays in UTC."""

import csv
import io
from datetime import UTC, datetime

import pytest
from django.test import Client
from django.urls import reverse

from reprocess.models import ConsolePreference
from tests.factories import UserFactory, make_batch

pytestmark = pytest.mark.django_db

WINDOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)


@pytest.fixture
def batch():
    return make_batch(errors={"1009": 1}, window_start=WINDOW)


def choose(client, zone):
    return client.post(reverse("console:preferences"), {"time_zone": zone})


def test_times_are_utc_until_the_user_chooses(client, batch):
    record = batch.records.get()

    page = client.get(reverse("console:record", args=[record.pk])).content.decode()

    assert "2026-01-15 10:00 UTC" in page
    assert "Times in UTC" in page


def test_a_chosen_zone_applies_to_pages_and_csv_and_says_so(client, batch):
    record = batch.records.get()

    response = choose(client, "America/New_York")

    assert response.status_code == 302
    assert ConsolePreference.objects.get().time_zone == "America/New_York"
    page = client.get(reverse("console:record", args=[record.pk])).content.decode()
    assert "2026-01-15 05:00 EST" in page
    assert "Times in E" in page  # EST or EDT, whichever holds today
    batches = client.get(reverse("console:batches")).content.decode()
    assert "2026-01-15 05:00 EST" in batches
    export = client.get(reverse("console:records-csv"))
    rows = list(csv.DictReader(io.StringIO(b"".join(export.streaming_content).decode())))
    assert rows[0]["usage_date"] == "2026-01-15T05:00:00-05:00"


def test_the_api_answers_in_utc_whatever_the_user_chose(client, batch):
    choose(client, "Asia/Kolkata")

    response = client.get("/api/v1/records/", {"batch": batch.pk})

    assert response.status_code == 200
    assert response.json()["results"][0]["usage_date"] == "2026-01-15T10:00:00Z"


def test_one_users_zone_is_not_anothers(client, batch):
    choose(client, "Asia/Tokyo")
    other = Client()
    other.force_login(UserFactory())

    page = other.get(reverse("console:batches")).content.decode()

    assert "2026-01-15 10:00 UTC" in page


def test_an_unknown_zone_is_refused_naming_the_field(client):
    response = choose(client, "Mars/Olympus_Mons")

    assert response.status_code == 400
    page = response.content.decode()
    assert "Select a valid choice" in page and 'name="time_zone"' in page
    assert not ConsolePreference.objects.exists()


def test_the_preferences_page_needs_a_login():
    response = Client().get(reverse("console:preferences"))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
