"""manage.py reprocess: queue failed or stuck aggregated records again, at one level."""

import getpass

from django.core.management.base import BaseCommand, CommandError

from reprocess.models import ReprocessLevel
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

    def handle(self, *args, **options):
        summary = options["status"] is not None or options["error_code"] is not None
        if options["all"] and summary:
            raise CommandError("--error-code and --status go with --batch, not --all.")
        if options["error_code"] is not None and options["status"] is None:
            raise CommandError("--error-code needs --status.")
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
            )
        except ReprocessError as exc:
            raise CommandError(exc.message) from exc
        if options["dry_run"]:
            self.stdout.write(
                f"Dry run ({run.object_name}): would queue {run.records_selected} records "
                f"in {run.batches_selected} batches."
            )
        else:
            self.stdout.write(self.style.SUCCESS(
                f"Reprocess run {run.pk} ({run.object_name}): queued {run.records_selected} "
                f"records in {run.batches_selected} batches."
            ))
