"""Structured logs: JSON lines carrying the sync's extra fields, readable text lines in
development, the same format in a Celery worker, and never the core Aria auth key."""

import json
import logging
import logging.config
import os
import queue
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
import responses

from allegro.logging import RoutineCeleryLines, logging_config, redact_url
from tests.services import ROOT, redis_db_url
from usage_sync.aggregation import aggregate_usage
from usage_sync.billing import AriaClient
from usage_sync.ingest import store_events, validate_events
from usage_sync.sync import sync_batch

AUTH_KEY = "log-test-secret-auth-key"
URL = "http://aria.test/v1/core"
CELERY_OWN_FORMAT = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+: (DEBUG|INFO|WARNING|ERROR)/")


@pytest.fixture
def log_as(capsys, settings):
    """Configure logging like a process with LOG_FORMAT=…; return a reader of its lines."""
    settings.ARIA_AUTH_KEY = AUTH_KEY

    def configure(log_format: str):
        logging.config.dictConfig(logging_config(log_format=log_format, level="DEBUG"))
        capsys.readouterr()
        return lambda: capsys.readouterr().err.splitlines()

    yield configure
    logging.config.dictConfig(settings.LOGGING)


@pytest.fixture
def synced_batch(db):
    """Sync one batch of 3 records through a fake core Aria; return its id."""
    raw = [
        {
            "event_id": f"log-{n}",
            "client_acct_id": f"ACME-{n}",
            "usage_type_code": "API_CALLS",
            "usage_units": "2",
            "usage_date": "2026-11-20T09:10:00Z",
        }
        for n in range(3)
    ]
    events, errors = validate_events(raw)
    assert not errors
    store_events(events)
    [batch_id] = aggregate_usage(now=datetime(2026, 11, 21, tzinfo=UTC)).batch_ids

    def sync():
        with responses.RequestsMock() as fake_aria:
            fake_aria.post(URL, json={"error_code": 0, "error_msg": "OK"})
            sync_batch(batch_id=batch_id, client=AriaClient(url=URL, auth_key=AUTH_KEY))
            [call] = fake_aria.calls
            assert json.loads(call.request.body)["auth_key"] == AUTH_KEY
        return batch_id

    return sync


def test_json_lines_parse_and_carry_the_sync_fields(log_as, synced_batch):
    read = log_as("json")

    batch_id = synced_batch()

    lines = [json.loads(line) for line in read()]
    [synced] = [line for line in lines if line["message"].startswith(f"batch {batch_id} synced")]
    assert synced["level"] == "INFO"
    assert synced["logger"] == "usage_sync.sync"
    assert synced["batch_id"] == batch_id
    assert synced["client_receipt_id"].startswith(f"AUB{batch_id}-")
    assert isinstance(synced["duration_ms"], int)
    assert (synced["sent"], synced["completed"], synced["errors"]) == (3, 3, 0)
    datetime.fromisoformat(synced["time"])
    [call] = [line for line in lines if line.get("rest_call") == "bulk_record_usage_m"]
    assert call["client_receipt_id"] == synced["client_receipt_id"]
    assert call["error_code"] == "0"
    assert AUTH_KEY not in "\n".join(json.dumps(line) for line in lines)


def test_text_lines_are_readable_with_the_fields_as_key_value(log_as, synced_batch):
    read = log_as("text")

    batch_id = synced_batch()

    [synced] = [line for line in read() if f"batch {batch_id} synced" in line]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO usage_sync\.sync batch ", synced)
    assert f" batch_id={batch_id} " in synced
    assert re.search(rf" client_receipt_id=AUB{batch_id}-\S+ ", synced)
    assert re.search(r" duration_ms=\d+ ", synced)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_auth_key_never_reaches_the_output(log_as, log_format):
    read = log_as(log_format)
    log = logging.getLogger("usage_sync.billing")

    log.warning("payload %s", {"auth_key": AUTH_KEY}, extra={"body": f'"auth_key": "{AUTH_KEY}"'})
    try:
        raise RuntimeError(f"rejected {AUTH_KEY}")
    except RuntimeError:
        log.exception("call failed")

    output = "\n".join(read())
    assert "payload" in output and "RuntimeError: rejected ***" in output
    assert AUTH_KEY not in output


def test_a_bad_log_format_fails_at_start():
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logging_config(log_format="xml", level="INFO")


def test_urls_shown_in_health_answers_lose_their_password():
    assert redact_url("redis://:pw-123@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("postgres://app:pw-123@db/x") == "postgres://app:***@db/x"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_celery_worker_logs_json_lines_too(tmp_path):
    env = {
        **os.environ,
        "LOG_FORMAT": "json",
        # The Redis `make test` found or started (not necessarily the machine's).
        "REDIS_URL": redis_db_url(10),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "allegro", "-q", "worker", "--pool=solo",
         "--loglevel=INFO", "--without-mingle", "--without-gossip",
         f"--hostname=logtest-{os.getpid()}@%h", "--queues=observability-log-test"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in worker.stdout], daemon=True)
    reader.start()
    seen = []
    # A worker that cannot reach its broker logs retries forever: wait for "ready." until
    # a deadline, not for a quiet moment.
    deadline = time.monotonic() + 60
    try:
        while not any('"celery.apps.worker"' in line and "ready." in line for line in seen):
            assert time.monotonic() < deadline, "the worker never got ready:\n" + "".join(seen)
            seen.append(lines.get(timeout=30))
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    records = [json.loads(line) for line in seen if line.startswith("{")]
    assert {"level", "logger", "message", "time"} <= set(records[-1])
    assert records[-1]["message"].endswith("ready.")
    assert not [line for line in seen if CELERY_OWN_FORMAT.match(line)]


@pytest.mark.parametrize("level, quiet", [("INFO", True), ("DEBUG", False)])
def test_celerys_routine_task_lines_show_only_at_debug_level(level, quiet):
    handler = logging_config(log_format="text", level=level)["handlers"]["console"]
    assert (handler["filters"] == ["routine"]) is quiet
    routine = RoutineCeleryLines()

    def shown(name, level, msg):
        return routine.filter(logging.LogRecord(name, level, __file__, 1, msg, (), None))

    assert not shown("celery.worker.strategy", logging.INFO, "Task %s[%s] received")
    assert not shown("celery.app.trace", logging.INFO, "Task %s[%s] succeeded in %ss: %s")
    assert not shown("celery.beat", logging.INFO, "Scheduler: Sending due task %s (%s)")
    assert shown("celery.beat", logging.INFO, "beat: Starting...")
    assert shown("celery.app.trace", logging.ERROR, "Task %s[%s] raised unexpected: %r")
    assert shown("usage_sync.sync", logging.INFO, "batch %s synced: …")
