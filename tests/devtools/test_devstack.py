"""End to end: `python -m devtools.devstack` starts the stack (its own PostgreSQL included),
the demo data flows through Kafka and the sync worker to the core Aria simulator, and Ctrl-C
stops all of it."""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psycopg
import pytest

BASE_DIR = Path(__file__).resolve().parents[2]
STARTED = re.compile(r"started ([\w-]+) \(pid (\d+)\)")
CONSOLE = re.compile(r"Console:\s+(http://\S+)")
SIMULATOR = re.compile(r"(http://\S+)/_sim/records")
DATABASE = re.compile(r"Database:\s+(postgres://\S+)\s+\(embedded PostgreSQL")
ANNOUNCED_UNTIL = "Press Ctrl-C"
# The sweep publishes within 15 s, the consumer starts within 20 s and joins its group.
SYNC_TIMEOUT_SECONDS = 90

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_pids_in_group(pgid: int) -> list[int]:
    """Return the pids of the group's processes that are not zombies."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # The process ended while we looked.
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture
def devstack(tmp_path):
    """Start devstack in a fresh var/ directory, on a free port, with a Redis URL nobody
    answers and no database, Kafka or core Aria configured: it starts its own PostgreSQL,
    Redis, tansu and simulator, as `make run` does on a machine with nothing."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "ARIA_API_URL"}
    }
    env |= {
        "DEV_PORT": str(free_port()),
        "DEV_VAR_DIR": str(tmp_path / "var"),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "devtools.devstack"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    children: dict[str, int] = {}
    try:
        yield process, lines, children
    finally:
        stop_everything(process, reader, lines, children)


def stop_everything(process, reader: threading.Thread, lines: queue.Queue, children: dict):
    """Leave nothing running, whatever the test managed to assert."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    # Children it announced that the test did not read about yet.
    while not lines.empty():
        line = lines.get()
        if line and (started := STARTED.search(line)):
            children[started[1]] = int(started[2])
    for pid in children.values():
        for leftover in live_pids_in_group(pid):
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass


def read_announcement(lines: queue.Queue, children: dict[str, int], *, timeout: float) -> str:
    """Return the text devstack prints once the web server answers; note the children."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if started := STARTED.search(line):
            children[started[1]] = int(started[2])
        if ANNOUNCED_UNTIL in line and any(CONSOLE.search(earlier) for earlier in seen):
            return "".join(seen)
    pytest.fail("devstack printed no console URL:\n" + "".join(seen[-40:]))


def query(database: str, sql: str) -> list[tuple]:
    with psycopg.connect(database, connect_timeout=10) as db:
        return db.execute(sql).fetchall()


def records_by_status(database: str) -> Counter:
    """Count the aggregated records by (status, sync error code) in devstack's database."""
    rows = query(
        database,
        "SELECT status, sync_error_code, COUNT(*) FROM usage_sync_usagerecord "
        "GROUP BY status, sync_error_code",
    )
    return Counter({(status, code): count for status, code, count in rows})


def wait_until_settled(database: str, *, timeout: float) -> Counter:
    """Wait until no record is PENDING and some are COMPLETE and ERROR; return the counts."""
    deadline = time.monotonic() + timeout
    counts = Counter()
    while time.monotonic() < deadline:
        counts = records_by_status(database)
        statuses = {status for status, _ in counts}
        if "PENDING" not in statuses and {"COMPLETE", "ERROR"} <= statuses:
            return counts
        time.sleep(2)
    pytest.fail(f"records did not settle in {timeout}s: {dict(counts)}")


def complete_client_record_ids(database: str) -> set[str]:
    rows = query(
        database, "SELECT client_record_id FROM usage_sync_usagerecord WHERE status = 'COMPLETE'"
    )
    return {client_record_id for (client_record_id,) in rows}


def stored_events(database: str) -> int:
    return query(database, "SELECT COUNT(*) FROM usage_sync_usageevent")[0][0]


def scrape_metrics(url: str) -> Counter:
    """Sum the counters of /metrics by (sample name, status label)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    totals = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[(sample.name, sample.labels.get("status", ""))] += sample.value
    return totals


def billed_client_record_ids(simulator_base: str) -> Counter:
    with urllib.request.urlopen(f"{simulator_base}/_sim/records", timeout=10) as response:
        records = json.load(response)["records"]
    return Counter(record["client_record_id"] for record in records)


def test_it_starts_every_service_syncs_the_demo_data_and_ctrl_c_stops_them_all(devstack):
    process, lines, children = devstack

    announcement = read_announcement(lines, children, timeout=120)

    # Nothing answered at REDIS_URL and no database, Kafka or core Aria was configured: it
    # started its own PostgreSQL, Redis, tansu broker and core Aria simulator.
    assert {"postgres", "redis", "tansu", "aria-sim", "web", "worker", "beat"} <= set(children)
    database = DATABASE.search(announcement)[1]
    console_url = CONSOLE.search(announcement)[1]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", console_url)
    with urllib.request.urlopen(console_url + "login/", timeout=10) as response:
        assert response.status == 200
        assert b"Allegro" in response.read()
    for name, pid in children.items():
        assert live_pids_in_group(pid), f"{name} is not running"

    # The demo batches go through Kafka and the worker to the simulator: the UNKNOWN-
    # accounts' records come back ERROR 1009, the rest COMPLETE.
    counts = wait_until_settled(database, timeout=SYNC_TIMEOUT_SECONDS)
    assert {code for status, code in counts if status == "ERROR"} == {"1009"}
    assert counts[("COMPLETE", "")] > counts[("ERROR", "1009")]
    # Billed exactly once each, and only those.
    billed = billed_client_record_ids(SIMULATOR.search(announcement)[1])
    assert set(billed) == complete_client_record_ids(database)
    assert set(billed.values()) == {1}

    # Ready, and one /metrics sums every process: the worker's stored outcomes and the
    # demo events ingested by the supervisor itself, each counted exactly once.
    with urllib.request.urlopen(console_url + "healthz/ready", timeout=10) as response:
        assert json.load(response)["status"] == "ok"
    metrics = scrape_metrics(console_url + "metrics")
    assert metrics.get(("allegro_record_outcomes_total", "COMPLETE"), 0) == sum(
        n for (status, _), n in counts.items() if status == "COMPLETE"
    )
    assert metrics[("allegro_record_outcomes_total", "ERROR")] == counts[("ERROR", "1009")]
    assert metrics[("allegro_events_ingested_total", "")] == stored_events(database)

    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=60) == 0
    for name, pid in children.items():
        # Each child led its own process group; the group covers Celery's pool processes.
        assert live_pids_in_group(pid) == [], f"{name} left processes behind"
