"""ARIA_AUTH_KEY and SECRET_KEY never show: not in logs (syncs that succeed, fail and
crash), the activity log, any console page, API response or admin page, nor error pages."""

import json
import logging

import pytest
import requests
import responses
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from allegro.logging import JsonFormatter, TextFormatter
from tests.factories import UserFactory, grant_reprocess, make_batch
from tests.security.endpoints import endpoints
from usage_sync.billing import AriaClient
from usage_sync.models import SyncActivity, UsageRecord
from usage_sync.sync import sync_batch

URL = "http://aria.test/v1/core"
ARIA_KEY = "aria-auth-7Hq2ZxPw9LmB4"
SECRET_KEY = "django-secret-Vb81Kq0sT3nUy6Rz2WpL9cXa4Me7Jd5Gh1Fo8Ni3Qe0Ys6Dt-prod"

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def secrets(settings):
    settings.ARIA_AUTH_KEY = ARIA_KEY
    settings.SECRET_KEY = SECRET_KEY
    settings.ARIA_API_URL = URL


def assert_no_secret(text: str, where: str) -> None:
    assert ARIA_KEY not in text, f"ARIA_AUTH_KEY in {where}"
    assert SECRET_KEY not in text, f"SECRET_KEY in {where}"


def ok(**extra):
    return {"error_code": 0, "error_msg": "OK", **extra}


def run_every_kind_of_sync():
    """Sync batches through success, record errors, an authentication error that echoes
    the key, transport failures, a reconciliation and an unexpected crash."""
    client = AriaClient()
    outcomes = [
        ok(),
        ok(error_records=[{"out_client_record_id": "AU-unknown", "record_error_code": 1009,
                           "record_error_msg": "Account not found"}]),
        # An API that quotes the rejected credential back must not get it stored or logged.
        {"error_code": 1004, "error_msg": f"authentication error: auth_key {ARIA_KEY} invalid"},
        requests.ConnectionError(f"connection refused to {URL}"),
        requests.Timeout("read timed out"),
    ]
    for answer in outcomes:
        batch = make_batch(pending=2)
        with responses.RequestsMock() as aria:
            if isinstance(answer, Exception):
                aria.post(URL, body=answer)
            else:
                aria.post(URL, json=answer)
            sync_batch(batch_id=batch.id, client=client)
    # HTTP 500, then records in doubt reconciled by get_usage_history_m (which fails).
    batch = make_batch(in_doubt=2)
    with responses.RequestsMock() as aria:
        aria.post(URL, json={"error_code": 1001, "error_msg": f"unexpected: {ARIA_KEY}"})
        sync_batch(batch_id=batch.id, client=client)
    batch = make_batch(pending=1)
    with responses.RequestsMock() as aria:
        aria.post(URL, status=500, body="Internal error")
        sync_batch(batch_id=batch.id, client=client)
    batch = make_batch(pending=1)
    with responses.RequestsMock() as aria:
        aria.post(URL, body=RuntimeError("the HTTP stack broke"))
        with pytest.raises(RuntimeError):
            sync_batch(batch_id=batch.id, client=client)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def synced():
    """Every log record of any level from the loggers a sync can reach, however the
    project's LOGGING routes or filters them."""
    collect = Collect()
    loggers = [logging.getLogger(name) for name in
               ("", "usage_sync", "reprocess", "allegro", "django", "urllib3", "requests")]
    saved = [(logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
    try:
        run_every_kind_of_sync()
    finally:
        for logger, (level, disabled) in zip(loggers, saved, strict=True):
            logger.removeHandler(collect)
            logger.setLevel(level)
            logger.disabled = disabled
    # A record that propagates is seen by several loggers' handlers: once is enough.
    return list({id(r): r for r in collect.records}.values())


def test_syncs_log_no_secret_not_even_before_redaction(synced):
    assert len(synced) >= 8
    assert any(r.exc_info for r in synced), "the crash was logged with its traceback"
    assert any("1004" in r.getMessage() or "1004" in str(r.__dict__) for r in synced)
    for record in synced:
        raw = json.dumps(record.__dict__, default=repr)
        assert_no_secret(raw + record.getMessage(), f"log record {record.getMessage()!r}")
    for formatter in (JsonFormatter(), TextFormatter()):
        for record in synced:
            assert_no_secret(formatter.format(record), f"{type(formatter).__name__} output")


def test_the_activity_log_holds_no_secret(synced):
    rows = list(SyncActivity.objects.values())
    assert len(rows) >= 7
    assert_no_secret(json.dumps(rows, default=str), "SyncActivity rows")
    assert SyncActivity.objects.filter(error_code="1004").exists()
    records = json.dumps(list(UsageRecord.objects.values()), default=str)
    assert_no_secret(records, "usage records")
    assert "1004" in records


def test_the_client_never_shows_its_key():
    client = AriaClient()
    assert client._auth_key == ARIA_KEY  # it holds the key: the checks below can fail
    public = {name: value for name, value in vars(client).items() if not name.startswith("_")}
    assert_no_secret(repr(client) + str(client) + repr(public), "AriaClient")


@pytest.fixture
def superuser_client(db):
    user = UserFactory(is_superuser=True, is_staff=True)
    grant_reprocess(user)
    client = Client()
    client.force_login(user)
    return client


def page_text(response) -> str:
    if response.streaming:
        return b"".join(response.streaming_content).decode()
    return response.content.decode()


def test_no_console_page_api_response_or_admin_page_shows_a_secret(
    synced, superuser_client, settings
):
    settings.HEALTH_CHECK_TIMEOUT_SECONDS = 0.5
    batch = make_batch(errors={"1004": 1})
    ids = {"batch_id": batch.id, "run_id": 1, "record_id": batch.records.first().id}
    superuser_client.post(reverse("console:reprocess"), {"level": "BATCH", "batch": batch.id})
    from reprocess.models import ReprocessRun

    ids["run_id"] = ReprocessRun.objects.latest("id").id
    seen = []
    for endpoint in endpoints():
        if endpoint.route in ("logout/",):
            continue
        url = endpoint.url(**ids)
        response = superuser_client.get(url)
        # Readiness answers 503 here: no broker, and core Aria is the fake host.
        assert response.status_code < 500 or endpoint.route == "healthz/ready", url
        assert_no_secret(page_text(response), url)
        seen.append(url)
    assert "/usage/activity/" in seen and "/api/v1/activity/" in seen
    # The admin: its index, every model's list, and the first object of each.
    pages = ["/admin/"]
    for model in admin.site._registry:
        opts = model._meta
        pages.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        first = model._default_manager.first()
        if first is not None:
            pages.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_change",
                                 args=[first.pk]))
    for url in pages:
        response = superuser_client.get(url)
        assert response.status_code == 200, url
        assert_no_secret(response.content.decode(), url)
    assert any("syncactivity" in url for url in pages)


def crash(*args, **kwargs):
    raise RuntimeError(f"unexpected failure with {ARIA_KEY} and {SECRET_KEY} inside")


@pytest.mark.parametrize("debug", [False, True])
def test_error_pages_show_no_secret(superuser_client, settings, monkeypatch, debug):
    settings.DEBUG = debug
    monkeypatch.setattr("reprocess.views.sync_outcome_chart", crash)
    superuser_client.raise_request_exception = False

    response = superuser_client.get(reverse("console:overview"))

    assert response.status_code == 500
    page = response.content.decode()
    if not debug:
        assert_no_secret(page, "the 500 page")
        assert "Traceback" not in page and "RuntimeError" not in page
    else:
        # The technical page (development only) shows the exception we raised, but its
        # settings listing masks both keys.
        settings_section = page.split('id="settings-info"', 1)[1]
        assert_no_secret(settings_section, "the DEBUG 500 page's settings")
        assert "ARIA_AUTH_KEY" in settings_section
