"""/healthz/live and /healthz/ready against the real PostgreSQL, Redis, tansu broker and
core Aria simulator, and with each of them unreachable."""

import socket
import time

import pytest
from django.db import connections

from tests.services import free_port, redis_db_url

pytestmark = pytest.mark.django_db

REDIS_TEST_URL = redis_db_url(10)


@pytest.fixture
def all_up(settings, kafka, simulator):
    settings.REDIS_URL = REDIS_TEST_URL
    settings.ARIA_API_URL = simulator.url
    settings.HEALTH_CHECK_TIMEOUT_SECONDS = 1.0
    return simulator


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def ready(client):
    started = time.monotonic()
    response = client.get("/healthz/ready")
    return response, response.json(), time.monotonic() - started


def test_live_answers_without_touching_any_dependency(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz/live")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


def test_ready_is_200_when_every_dependency_answers(client, all_up):
    response, body, _ = ready(client)

    assert response.status_code == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "kafka", "core_aria"}
    for name, check in body["checks"].items():
        assert check["ok"] is True, name
        assert isinstance(check["ms"], int)
    # Reachability only: no API method was called on core Aria (nothing was billed).
    assert all_up.calls() == []


def test_ready_is_503_naming_the_broker_when_it_is_down(client, all_up, settings):
    settings.KAFKA_BOOTSTRAP_SERVERS = f"127.0.0.1:{free_port()}"

    response, body, elapsed = ready(client)

    assert response.status_code == 503
    assert body["status"] == "unavailable"
    assert body["failed"] == ["kafka"]
    assert body["checks"]["kafka"]["ok"] is False
    assert "transport" in body["checks"]["kafka"]["error"].lower()
    assert body["checks"]["database"]["ok"] is True
    assert elapsed < 2.5


def test_ready_is_503_naming_core_aria_when_the_simulator_is_down(client, all_up, settings):
    settings.ARIA_API_URL = f"http://127.0.0.1:{free_port()}/v1/core"

    response, body, _ = ready(client)

    assert response.status_code == 503
    assert body["failed"] == ["core_aria"]
    assert "ConnectionError" in body["checks"]["core_aria"]["error"]


def test_ready_is_503_naming_redis_and_never_shows_its_password(client, all_up, settings):
    settings.REDIS_URL = f"redis://:hunter2-redis-pass@127.0.0.1:{free_port()}/0"
    settings.ARIA_AUTH_KEY = "top-secret-aria-key"

    response, body, _ = ready(client)

    assert response.status_code == 503
    assert body["failed"] == ["redis"]
    assert body["checks"]["redis"]["error"]
    assert b"hunter2-redis-pass" not in response.content
    assert b"top-secret-aria-key" not in response.content


def test_ready_is_503_naming_the_database_when_it_refuses(client, all_up, monkeypatch):
    # Only new connections see this port; the test's own connection is already open.
    monkeypatch.setitem(connections["default"].settings_dict, "HOST", "127.0.0.1")
    monkeypatch.setitem(connections["default"].settings_dict, "PORT", str(free_port()))
    monkeypatch.setitem(connections["default"].settings_dict, "PASSWORD", "pg-secret-pass")

    response, body, _ = ready(client)

    assert response.status_code == 503
    assert body["failed"] == ["database"]
    assert body["checks"]["database"]["error"]
    assert b"pg-secret-pass" not in response.content


def test_checks_run_side_by_side_each_within_its_bound(client, all_up, settings, silent_server):
    # Two checks that each take their full second: concurrent, the answer takes ~1 s.
    settings.KAFKA_BOOTSTRAP_SERVERS = f"127.0.0.1:{free_port()}"
    settings.ARIA_API_URL = f"http://127.0.0.1:{silent_server}/v1/core"

    response, body, elapsed = ready(client)

    assert response.status_code == 503
    assert body["failed"] == ["core_aria", "kafka"]
    assert "timed out" in body["checks"]["core_aria"]["error"].lower()
    assert elapsed < 1.9


def test_an_error_that_quotes_a_secret_is_redacted(client, all_up, settings, monkeypatch):
    from allegro import health

    settings.ARIA_AUTH_KEY = "top-secret-aria-key"

    def leaky_check(timeout):
        raise RuntimeError("core Aria refused auth_key=top-secret-aria-key")

    monkeypatch.setitem(health.CHECKS, "core_aria", leaky_check)

    response, body, _ = ready(client)

    assert response.status_code == 503
    assert body["checks"]["core_aria"]["error"] == "RuntimeError: core Aria refused auth_key=***"
    assert b"top-secret-aria-key" not in response.content
