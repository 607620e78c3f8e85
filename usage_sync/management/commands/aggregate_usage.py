from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError

from usage_sync.aggregation import aggregate_usage


class Command(BaseCommand):
    help = "Aggregate the un-aggregated usage events of every closed window, once."

    def add_arguments(self, parser):
        parser.add_argument(
            "--until",
            help="ISO 8601 date-time to treat as 'now' (windows closed by then are aggregated).",
        )

    def handle(self, *args, until=None, **options):
        now = None
        if until:
            try:
                now = datetime.fromisoformat(until)
            except ValueError:
                raise CommandError(f"--until: {until!r} is not an ISO 8601 date-time") from None
            if now.tzinfo is None:
                now = now.replace(tzinfo=UTC)
        result = aggregate_usage(now=now, actor="aggregate_usage command")
        self.stdout.write(
            f"Aggregated {result.events} events into {result.records} records "
            f"in {result.batches} batches (windows ending before {result.boundary.isoformat()})."
        )
