"""manage.py reprocess: queue failed or stuck aggregated records again, at one level."""

import argparse
import getpass
import time

from django.core.management.base import BaseCommand, CommandError

from allegro.progress import progress
from reprocess.models import ReprocessLevel, ReprocessRun
from reprocess.reprocess import ReprocessError, reprocess_run_create


class Command(BaseCommand):
    help = (
        "Reprocess aggregated usage: --all, --batch N, or --batch N --status S "
        "[--error-code C] for one error summary group."
    )

    def add_arguments(self, parser):
        scope = parser.add_mutually_exclusive_group(required=True)
        scope.add_argument("--all", action="store_true", help="Every incomplete batch.")
        scope.add_argument("--batch", type=int, metavar="N", help="One batch.")
        parser.add_argument("--error-code", default=None, metavar="C",
                            help="With --batch and --status: the summary group's error code.")
        parser.add_argument("--status", default=None, metavar="S",
                            help="With --batch: reprocess only this summary group (ERROR, "
                                 "PENDING).")
        parser.add_argument("--dry-run", action="store_true", help="Count only; change nothing.")
        parser.add_argument("--reason", default="", help="Why, for the activity log.")
        parser.add_argument("--actor", default=f"cli:{getpass.getuser()}",
                            help="Who, for the activity log (default: cli:<os user>).")
        parser.add_argument("--wait", action="store_true",
                            help="Wait until the workers have settled every queued record "
                                 "(COMPLETE, ERROR or IGNORED); a progress bar on a terminal.")
        parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                            help="With --wait: give up waiting after this long (default 3600); "
                                 "the workers carry on.")
        parser.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS",
                            help=argparse.SUPPRESS)

    def handle(self, *args, **options):
        summary = options["status"] is not None or options["error_code"] is not None
        if options["all"] and summary:
            raise CommandError("--error-code and --status go with --batch, not --all.")
        if options["error_code"] is not None and options["status"] is None:
            raise CommandError("--error-code needs --status.")
        if options["wait"] and options["dry_run"]:
            raise CommandError("--wait has nothing to wait for with --dry-run.")
        if options["timeout"] <= 0 or options["poll_interval"] <= 0:
            raise CommandError("--timeout and --poll-interval must be positive.")
        level = (
            ReprocessLevel.ALL if options["all"]
            else ReprocessLevel.ERROR_SUMMARY if summary
            else ReprocessLevel.BATCH
        )
        try:
            run = reprocess_run_create(
                level=level,
                batch_id=options["batch"],
                error_code=options["error_code"],
                status=options["status"],
                actor=options["actor"],
                reason=options["reason"],
                dry_run=options["dry_run"],
                # A shell is off the request path already: queue here, whatever the size.
                defer=False,
            )
        except ReprocessError as exc:
            raise CommandError(exc.message) from exc
        if options["dry_run"]:
            self.stdout.write(
                f"Dry run ({run.object_name}): would queue up to {run.records_expected} "
                f"records in {run.batches_expected} batches."
            )
        else:
            self.stdout.write(self.style.SUCCESS(
                f"Reprocess run {run.pk} ({run.object_name}): queued {run.records_selected} "
                f"records in {run.batches_selected} batches."
            ))
            if options["wait"]:
                self._wait(run, timeout=options["timeout"], interval=options["poll_interval"])

    def _wait(self, run: ReprocessRun, *, timeout: float, interval: float) -> None:
        """Poll the run's progress (one GROUP BY) until no queued record is PENDING."""
        started = time.monotonic()
        settled = 0
        with progress(
            f"Run {run.pk}", total=run.records_selected, unit="record"
        ) as advance:
            while True:
                counts = run.progress()
                now_settled = run.records_selected - counts["pending"]
                advance(
                    max(now_settled - settled, 0),
                    note=f"{counts['completed']} complete, {counts['errored']} error",
                )
                settled = max(settled, now_settled)
                if not counts["pending"]:
                    run.mark_finished(counts)
                    break
                if time.monotonic() - started >= timeout:
                    raise CommandError(
                        f"Reprocess run {run.pk}: {counts['pending']} of "
                        f"{run.records_selected} records still PENDING after {timeout:.0f} s "
                        f"({counts['completed']} complete, {counts['errored']} error). The "
                        f"workers carry on; follow it at /api/v1/reprocess/{run.pk}/."
                    )
                time.sleep(interval)
        self.stdout.write(
            f"Reprocess run {run.pk} settled in {time.monotonic() - started:.1f} s: "
            f"{counts['completed']} complete, {counts['errored']} error, "
            f"{counts['ignored']} ignored."
        )
