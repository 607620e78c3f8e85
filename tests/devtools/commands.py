"""Running the tooling commands (bench, soak) as a user would, in databases of their own."""

import os
import signal
import subprocess
import sys
import uuid

import pytest
from django.conf import settings

from devtools.benchmarks import database_exists, server_settings


def own_database_name(command: str) -> str:
    """A database name of this test's own, so a real `make bench` or `make soak` is left
    alone."""
    return f"allegro_{command}_test_{uuid.uuid4().hex[:12]}"


def command_database_exists(name: str) -> bool:
    return database_exists(name=name, server=server_settings(settings.DATABASES["default"]))


def run_command(name: str, *args: str, timeout: float, grace: float,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `manage.py <name>`; past `timeout`, SIGTERM it (it stops what it started and
    drops its database), wait `grace` seconds, then kill its whole process group."""
    command = [sys.executable, "manage.py", name, *args]
    process = subprocess.Popen(
        command, cwd=settings.BASE_DIR, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.communicate(timeout=grace)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{name} did not finish within {timeout:.0f} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
