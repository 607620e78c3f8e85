import time
from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError

from allegro.progress import progress
from usage_sync.aggregation import STEPS, aggregate_and_publish


class Command(BaseCommand):
    help = (
        "Aggregate the un-aggregated usage events of every closed window, once, and publish "
        "the new batch ids for the sync."
    )

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
        started = time.monotonic()
        # One transaction of a few set-based statements: the bar moves per step, not per row.
        with progress("Aggregating", total=len(STEPS), unit="step") as advance:
            done: set[str] = set()
            advance(0, note=STEPS[0])

            def on_step(step: str) -> None:
                # The note names the step under way; the bar counts each step once.
                following = STEPS[STEPS.index(step) + 1 :]
                advance(0 if step in done else 1, note=following[0] if following else "done")
                done.add(step)

            # Published at once, as the scheduled runs are, not left for the sweep.
            result = aggregate_and_publish(
                now=now, actor="aggregate_usage command", on_step=on_step
            )
        self.stdout.write(
            f"Aggregated {result.events} events into {result.records} records "
            f"in {result.batches} batches (windows ended by {result.boundary.isoformat()}) "
            f"in {time.monotonic() - started:.1f} s."
        )
