"""Load demo usage for `make run`: a few thousand raw events of the last two days, aggregated.

About a tenth of the events belong to `UNKNOWN-…` accounts that the core Aria simulator
does not know, so that sync errors show up in the console once the sync service runs.
"""

import random
from datetime import timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from usage_sync.aggregation import aggregate_usage
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import UsageEvent

EVENT_ID_PREFIX = "demo-"
KNOWN_ACCOUNTS = [
    "ACME-001", "ACME-002", "GLOBEX-001", "INITECH-001",
    "UMBRELLA-001", "STARK-001", "WAYNE-001", "HOOLI-001",
]
UNKNOWN_ACCOUNTS = ["UNKNOWN-001", "UNKNOWN-002"]
UNKNOWN_SHARE = 0.10
SPREAD = timedelta(days=2)


class Command(BaseCommand):
    help = "Load demo usage events (once) and aggregate them."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=3000, help="events to generate")
        parser.add_argument(
            "--force",
            action="store_true",
            help="load another set even though demo events exist (new event ids)",
        )

    def handle(self, *args, count, force, **options):
        if count < 1:
            raise CommandError("--count must be at least 1")
        existing = UsageEvent.objects.filter(event_id__startswith=EVENT_ID_PREFIX).count()
        if existing and not force:
            self.stdout.write(
                f"Demo data already loaded ({existing} events); --force loads another set."
            )
            return
        first = _next_demo_number()
        raw_events = list(generate_events(first=first, count=count, now=timezone.now()))
        events, errors = validate_events(raw_events)
        if errors:
            # The generator is ours: an invalid event is a bug here, not bad input.
            raise CommandError(f"generated invalid demo events: {errors[:3]}")
        # One transaction: a failed aggregation leaves no half-loaded set to be skipped later.
        with transaction.atomic():
            stored = store_events(events)
            result = aggregate_usage(actor="load_demo_data command")
        unknown = sum(e["client_acct_id"].startswith("UNKNOWN-") for e in raw_events)
        self.stdout.write(
            f"Loaded {stored.created} demo events ({unknown} for unknown accounts); "
            f"aggregated {result.events} events into {result.records} records "
            f"in {result.batches} batches."
        )


def _next_demo_number() -> int:
    # Zero-padded ids sort like numbers, so the greatest id holds the greatest number.
    last = (
        UsageEvent.objects.filter(event_id__startswith=EVENT_ID_PREFIX)
        .order_by("-event_id")
        .values_list("event_id", flat=True)
        .first()
    )
    return int(last.removeprefix(EVENT_ID_PREFIX)) + 1 if last else 1


def generate_events(*, first: int, count: int, now):
    """Yield `count` raw events (ingest API shape) numbered from `first`, dated before `now`."""
    # Seeded by the first number: the same set always has the same accounts and amounts.
    rng = random.Random(first)
    for number in range(first, first + count):
        if rng.random() < UNKNOWN_SHARE:
            account = rng.choice(UNKNOWN_ACCOUNTS)
        else:
            account = rng.choice(KNOWN_ACCOUNTS)
        event = {
            "event_id": f"{EVENT_ID_PREFIX}{number:06d}",
            "client_acct_id": account,
            "usage_date": (now - rng.random() * SPREAD).isoformat(),
            **_usage(rng),
        }
        yield event


def _usage(rng: random.Random) -> dict:
    # Four usage types; two carry qualifiers, and a few storage events carry an amount.
    kind = rng.randrange(4)
    if kind == 0:
        return {"usage_type_code": "API_CALLS", "usage_units": str(rng.randint(1, 500))}
    if kind == 1:
        usage = {
            "usage_type_code": "STORAGE_GB",
            "usage_units": str(Decimal(rng.randint(1, 100_000)) / 1000),
        }
        if rng.random() < 0.2:
            usage["amount"] = str(Decimal(rng.randint(100, 5_000)) / 100)
        return usage
    if kind == 2:
        return {
            "usage_type_code": "SMS_SENT",
            "usage_units": str(rng.randint(1, 20)),
            "qualifier_1": rng.choice(["US", "GB", "DE", "FR"]),
        }
    return {
        "usage_type_code": "DATA_TRANSFER_MB",
        "usage_units": str(Decimal(rng.randint(1, 2_000_000)) / 100),
        "qualifier_1": rng.choice(["us-east", "eu-west"]),
        "qualifier_2": rng.choice(["ingress", "egress"]),
    }
