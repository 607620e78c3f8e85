"""manage.py reconcile_usage: check that events, records, batches and core Aria agree."""

from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError

from allegro.progress import progress
from usage_sync.reconcile import reconcile, reconcile_steps


class Command(BaseCommand):
    help = (
        "Check every invariant between usage events, aggregated records, batches and what "
        "core Aria holds (get_usage_history_m). Prints each disagreement; exits 1 if any."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--since", metavar="YYYY-MM-DD",
            help="Only usage dated on/after this day (00:00 UTC).",
        )
        parser.add_argument(
            "--no-aria", action="store_true",
            help="Check the database only; do not ask core Aria.",
        )

    def handle(self, *args, since=None, no_aria=False, **options):
        if since:
            try:
                since = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=UTC)
            except ValueError:
                raise CommandError(f"--since: {since!r} is not a YYYY-MM-DD date") from None
        check_aria = not no_aria
        with progress(
            "Reconciling", total=reconcile_steps(since=since, check_aria=check_aria), unit="check"
        ) as advance:
            report = reconcile(since=since, check_aria=check_aria, advance=advance)
        checked = ", ".join(f"{name} {n}" for name, n in report.checked.items())
        self.stdout.write(f"Checked: {checked}.")
        for problem in report.problems:
            self.stdout.write(f"DISAGREES: {problem}")
        if not report.ok:
            raise CommandError(f"{len(report.problems)} disagreements.")
        scope = "database only" if no_aria else "database and core Aria"
        self.stdout.write(self.style.SUCCESS(f"Everything reconciles ({scope})."))
