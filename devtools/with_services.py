"""Run a command with PostgreSQL and Redis it can use: `make test` runs pytest through this.

    python -m devtools.with_services pytest -x

DATABASE_URL: kept if set; otherwise the machine's PostgreSQL at 127.0.0.1:5432 when it
answers, else an embedded PostgreSQL on a free port (data in var/test-postgres, fsync
off). REDIS_URL: kept if a Redis answers there (default 127.0.0.1:6379), else a local
redis-server on a free port. The servers started here are stopped when the command ends;
their output goes to var/test-services.log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from .postgres import LOCAL_URL, answers
from .processes import BASE_DIR, Stack, say
from .services import postgres_service, redis_service

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def main(argv: list[str]) -> int:
    if not argv:
        say("services", "usage: python -m devtools.with_services COMMAND [ARGS…]")
        return 2
    var_dir = Path(os.environ.get("DEV_VAR_DIR", BASE_DIR / "var")).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    log = (var_dir / "test-services.log").open("a")

    def to_log(name: str, line: str) -> None:
        log.write(f"{name:>8} | {line.rstrip()}\n")
        log.flush()

    stack = Stack(output=to_log)
    # Our own notes go to stderr: the command's stdout may be machine-read (make bench).
    with contextlib.redirect_stdout(sys.stderr):
        try:
            return _run(argv, stack, var_dir)
        finally:
            stack.stop_all()
            log.close()


def _run(argv: list[str], stack: Stack, var_dir: Path) -> int:
    """Find or start the servers, then run the command with their URLs in its environment."""
    if not os.environ.get("DATABASE_URL") and answers(LOCAL_URL):
        os.environ["DATABASE_URL"] = LOCAL_URL
    # pytest-django creates its test database anew in that server at every run.
    database_url, postgres = postgres_service(
        var_dir / "test-postgres", database="postgres", durable=False
    )
    os.environ.setdefault("REDIS_URL", DEFAULT_REDIS_URL)
    redis_url, redis_server = redis_service(var_dir / "test-redis")
    os.environ.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
    for child in (postgres, redis_server):
        if child:
            stack.start(child)
    # Ctrl-C reaches the command (same terminal); we wait for it to end, then clean up.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call(argv)
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
