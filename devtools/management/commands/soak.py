import argparse
import json
import os
import signal
import sys
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from devtools import benchmarks, soak


class Command(BaseCommand):
    help = (
        "Soak: ingest at a steady rate over HTTP while aggregation, sync (Kafka, a Celery "
        "worker, the core Aria simulator) and console reads run alongside, for a bounded "
        "time; then drain and check the invariants (reconcile). Runs in a dedicated "
        "PostgreSQL database, created and dropped here. Prints JSON lines on stdout; notes "
        "go to stderr. Exits 1 if an invariant fails, the pipeline does not drain, or any "
        "request failed (HTTP 5xx included)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--seconds", type=float, default=soak.DEFAULT_SECONDS,
            help=f"how long to ingest (default {soak.DEFAULT_SECONDS})",
        )
        parser.add_argument(
            "--rate", type=float, default=soak.DEFAULT_RATE,
            help=f"events per second to ingest (default {soak.DEFAULT_RATE}), "
            f"{soak.REQUEST_SIZE} to a request",
        )
        parser.add_argument(
            "--database-name",
            default=soak.DEFAULT_DATABASE_NAME,
            help=f"the database to create and drop (default {soak.DEFAULT_DATABASE_NAME})",
        )
        parser.add_argument(
            "--restart-worker-at", type=float, metavar="SECONDS",
            help="stop the Celery worker (SIGTERM) and start it again this many seconds into "
            "the load; a soak_worker_restart line reports the claims of the next minute",
        )
        parser.add_argument(
            "--logs", type=Path, metavar="DIR",
            help="keep the processes' logs (tansu, simulator, worker) in DIR",
        )
        # Internal: the child process run with DATABASE_URL set to the soak database.
        parser.add_argument("--inside", help=argparse.SUPPRESS)

    def handle(self, *args, seconds, rate, database_name, logs=None, inside=None,
               restart_worker_at=None, **options):
        if seconds <= 0 or rate <= 0:
            raise CommandError("--seconds and --rate must be positive")
        # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the database dropped.
        signal.signal(signal.SIGTERM, benchmarks.raise_system_exit)
        if inside:
            self._soak(database_name=inside, seconds=seconds, rate=rate, logs=logs,
                       restart_worker_at=restart_worker_at)
            return
        server = benchmarks.server_settings(settings.DATABASES["default"])
        try:
            with benchmarks.bench_database(name=database_name, server=server) as url:
                command = [
                    sys.executable, str(settings.BASE_DIR / "manage.py"), "soak",
                    "--inside", database_name, "--seconds", str(seconds), "--rate", str(rate),
                ]
                if logs:
                    command += ["--logs", str(logs.resolve())]
                if restart_worker_at is not None:
                    command += ["--restart-worker-at", str(restart_worker_at)]
                status = benchmarks.run_child(command, database_url=url)
        except benchmarks.BenchmarkError as exc:
            raise CommandError(str(exc)) from exc
        if status:
            raise CommandError(f"the soak failed (exit status {status}); see above")

    def _soak(self, *, database_name, seconds, rate, logs, restart_worker_at):
        if connection.settings_dict["NAME"] != database_name:
            raise CommandError(
                f"--inside {database_name}: DATABASE_URL does not point at that database"
            )
        call_command("migrate", verbosity=0, interactive=False)
        try:
            results = soak.soak(
                database_url=os.environ["DATABASE_URL"], seconds=seconds, rate=rate, logs=logs,
                restart_worker_at=restart_worker_at,
            )
        except benchmarks.BenchmarkError as exc:
            raise CommandError(str(exc)) from exc
        for result in results:
            self.stdout.write(json.dumps(result))
        self.stdout.flush()
        summary = results[-1]
        if not summary["ok"]:
            invariants = summary["invariants"]
            for problem in invariants["problems"]:
                self.stderr.write(f"DISAGREES: {problem}")
            raise CommandError(
                f"soak failed: {invariants['problem_count']} invariant problems, "
                f"{summary['errors']['http_5xx']} HTTP 5xx, {summary['errors']['other']} other "
                "failed requests"
            )

