import argparse
import json
import os
import signal
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from allegro.progress import progress
from devtools import benchmarks, import_bench

# In the order a full run takes them.
BENCHMARKS = ["ingest", "file_import", "aggregation", "sync", "reprocess", "console"]


class Command(BaseCommand):
    help = (
        "Benchmark ingest over HTTP, the file import (ingest_usage) beside a bare COPY, "
        "aggregation, sync end to end (Kafka, a Celery "
        "worker, the core Aria simulator) and reprocess-all (the API over HTTP, then the "
        "re-sync) in a dedicated PostgreSQL database "
        "(created and dropped here; your own database is never touched). "
        "Prints one JSON object per line on stdout; notes go to stderr."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--only", choices=BENCHMARKS
        )
        parser.add_argument(
            "--events",
            "--records",
            dest="events",
            type=int,
            help=f"events per benchmark, to scale down a quick run (default "
            f"{benchmarks.INGEST_EVENTS:,} for ingest, "
            f"{import_bench.FILE_IMPORT_EVENTS:,} for file_import (lines of the file), "
            f"{benchmarks.AGGREGATION_EVENTS:,} "
            f"for aggregation, {benchmarks.SYNC_RECORDS:,} for sync, where each event "
            f"becomes one record, {benchmarks.SYNC_BATCH_SIZE:,} to a batch, and "
            f"{benchmarks.REPROCESS_RECORDS:,} ERROR records for reprocess)",
        )
        parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
        parser.add_argument(
            "--clients", type=int, nargs="+", default=[1, 2],
            help="concurrent ingest clients; one run per value (default: 1 2)",
        )
        parser.add_argument(
            "--database-name",
            default=benchmarks.DEFAULT_DATABASE_NAME,
            help=f"the database to create and drop (default {benchmarks.DEFAULT_DATABASE_NAME})",
        )
        # Internal: the child process run with DATABASE_URL set to the bench database.
        parser.add_argument("--inside", help=argparse.SUPPRESS)

    def handle(self, *args, inside=None, database_name, **options):
        if options["events"] is not None and options["events"] < 1:
            raise CommandError("--events must be at least 1")
        if options["workers"] < 1 or min(options["clients"]) < 1:
            raise CommandError("--workers and --clients must be at least 1")
        # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the database dropped.
        signal.signal(signal.SIGTERM, benchmarks.raise_system_exit)
        if inside:
            self._run_benchmarks(database_name=inside, **options)
        else:
            self._run_in_bench_database(database_name=database_name, **options)

    def _run_in_bench_database(self, *, database_name, **options):
        server = benchmarks.server_settings(settings.DATABASES["default"])
        forwarded = ["--workers", str(options["workers"]), "--clients"]
        forwarded += [str(clients) for clients in options["clients"]]
        if options["only"]:
            forwarded += ["--only", options["only"]]
        if options["events"]:
            forwarded += ["--events", str(options["events"])]
        try:
            with benchmarks.bench_database(name=database_name, server=server) as url:
                command = [
                    sys.executable, str(settings.BASE_DIR / "manage.py"), "bench",
                    "--inside", database_name, *forwarded,
                ]
                status = benchmarks.run_child(command, database_url=url)
        except benchmarks.BenchmarkError as exc:
            raise CommandError(str(exc)) from exc
        if status:
            raise CommandError(f"the benchmarks failed (exit status {status}); see above")

    def _run_benchmarks(self, *, database_name, only, events, workers, clients, **options):
        if connection.settings_dict["NAME"] != database_name:
            raise CommandError(
                f"--inside {database_name}: DATABASE_URL does not point at that database"
            )
        call_command("migrate", verbosity=0, interactive=False)
        machine = benchmarks.machine_facts()
        plan = [name for name in BENCHMARKS if only in (None, name)]
        # One bar over the runs (ingest runs once per client count and key density), on stderr
        # and only on a terminal: stdout stays JSON lines.
        runs = sum(2 * len(clients) if name == "ingest" else 1 for name in plan)
        with progress("Benchmarks", total=runs, unit="run") as advance:
            try:
                for name in plan:
                    advance(0, note=name)

                    def on_phase(phase: str, name=name) -> None:
                        advance(0, note=f"{name}: {phase}")

                    for result in self._results(name, events=events, workers=workers,
                                                clients=clients, on_phase=on_phase):
                        self._emit({**result, "machine": machine})
                        advance(1)
            except benchmarks.BenchmarkError as exc:
                raise CommandError(str(exc)) from exc

    def _results(self, name: str, *, events, workers, clients, on_phase):
        """Yield the result dicts of one benchmark (ingest: one per client count)."""
        database_url = os.environ["DATABASE_URL"]
        if name == "ingest":
            yield from benchmarks.bench_ingest_api(
                database_url=database_url,
                events=events or benchmarks.INGEST_EVENTS,
                workers=workers,
                client_counts=tuple(clients),
                on_phase=on_phase,
            )
        elif name == "file_import":
            yield import_bench.bench_file_import(
                events=events or import_bench.FILE_IMPORT_EVENTS, on_phase=on_phase
            )
        elif name == "aggregation":
            yield benchmarks.bench_aggregation(
                events=events or benchmarks.AGGREGATION_EVENTS, on_phase=on_phase
            )
        elif name == "sync":
            yield benchmarks.bench_sync(
                database_url=database_url, records=events or benchmarks.SYNC_RECORDS,
                on_phase=on_phase,
            )
        elif name == "reprocess":
            yield benchmarks.bench_reprocess(
                database_url=database_url, records=events or benchmarks.REPROCESS_RECORDS,
                on_phase=on_phase,
            )
        elif name == "console":
            yield benchmarks.bench_console(
                database_url=database_url, records=events or benchmarks.CONSOLE_RECORDS,
                on_phase=on_phase,
            )

    def _emit(self, result: dict) -> None:
        self.stdout.write(json.dumps(result))
        self.stdout.flush()

