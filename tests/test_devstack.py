"""End to end: `python -m allegro.devstack` starts the stack and Ctrl-C stops all of it."""

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
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"started (\w+) \(pid (\d+)\)")
CONSOLE = re.compile(r"Console:\s+(http://\S+)")

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


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
    """Start devstack on a fresh SQLite file, a free port and a Redis URL nobody answers."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DEV_PORT": str(free_port()),
        "DEV_VAR_DIR": str(tmp_path / "var"),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "allegro.devstack"],
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


def wait_for_console_url(lines: queue.Queue, children: dict[str, int], *, timeout: float):
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
        if console := CONSOLE.search(line):
            return console[1]
    pytest.fail("devstack printed no console URL:\n" + "".join(seen[-40:]))


def test_it_starts_every_service_and_ctrl_c_stops_them_all(devstack):
    process, lines, children = devstack

    console_url = wait_for_console_url(lines, children, timeout=120)

    # Nothing answered at REDIS_URL, so it started its own Redis.
    assert {"redis", "web", "worker", "beat"} <= set(children)
    assert console_url.endswith("/admin/")
    with urllib.request.urlopen(console_url + "login/", timeout=10) as response:
        assert response.status == 200
    for name, pid in children.items():
        assert live_pids_in_group(pid), f"{name} is not running"

    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=60) == 0
    for name, pid in children.items():
        # Each child led its own process group; the group covers Celery's pool processes.
        assert live_pids_in_group(pid) == [], f"{name} left processes behind"
