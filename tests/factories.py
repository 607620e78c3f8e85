"""Shared test data: factory_boy factories, raw event payloads, and batches with records
in chosen states built directly (no aggregation, no sync)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import count

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

from usage_sync.models import AggregatedBatch, BatchStatus, RecordStatus, UsageEvent, UsageRecord

BASE_DATE = datetime(2026, 11, 20, tzinfo=UTC)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]

    username = factory.Sequence(lambda n: f"operator{n}")
    password = factory.django.Password("correct horse battery")


class UsageEventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = UsageEvent

    event_id = factory.Sequence(lambda n: f"evt-{n:08d}")
    client_acct_id = factory.Sequence(lambda n: f"ACCT-{n % 3}")
    usage_type_code = "API_CALLS"
    usage_units = Decimal("1")
    usage_date = factory.Sequence(lambda n: BASE_DATE + timedelta(minutes=n % 180))


def event_payload(n: int, **overrides) -> dict:
    """Return one valid raw event as the API takes it."""
    payload = {
        "event_id": f"api-{n:08d}",
        "client_acct_id": f"ACCT-{n % 4}",
        "usage_type_code": "API_CALLS",
        "usage_units": "2.5",
        "usage_date": (BASE_DATE + timedelta(minutes=n % 240)).isoformat(),
    }
    payload.update(overrides)
    return payload


WINDOW = datetime(2026, 11, 20, tzinfo=UTC)
_numbers = count(1)


def make_batch(
    *,
    complete: int = 0,
    errors: dict[str, int] | None = None,
    pending: int = 0,
    in_doubt: int = 0,
    ignored: int = 0,
    window_start: datetime | None = None,
    account: str = "ACME-001",
    in_flight: bool = False,
) -> AggregatedBatch:
    """Create a batch with records in the given states and counters that add up.

    `errors` maps an Aria error code to how many ERROR records carry it.
    """
    n = next(_numbers)
    start = window_start or WINDOW + timedelta(hours=n)
    batch = AggregatedBatch.objects.create(
        window_start=start, window_end=start + timedelta(hours=1), sequence=1,
        published_at=timezone.now(),
    )
    states = [(RecordStatus.COMPLETE, "", None)] * complete
    for code, how_many in (errors or {}).items():
        states += [(RecordStatus.ERROR, code, None)] * how_many
    states += [(RecordStatus.PENDING, "", None)] * pending
    # Sent a day ago: long settled, so the next sync looks them up in core Aria.
    states += [(RecordStatus.PENDING, "", timezone.now() - timedelta(days=1))] * in_doubt
    states += [(RecordStatus.IGNORED, "", None)] * ignored
    UsageRecord.objects.bulk_create(
        UsageRecord(
            batch=batch,
            client_record_id=f"AU{batch.id}-{i}",
            client_acct_id=account,
            usage_type_code="API_CALLS",
            usage_units=Decimal("1.5"),
            usage_date=start,
            window_end=batch.window_end,
            event_count=1,
            status=status,
            sync_error_code=code,
            sync_error_message=f"error {code}" if code else "",
            sent_at=sent_at,
        )
        for i, (status, code, sent_at) in enumerate(states)
    )
    AggregatedBatch.objects.filter(pk=batch.pk).recount(release=True)
    if in_flight:
        AggregatedBatch.objects.filter(pk=batch.pk).update(
            status=BatchStatus.IN_PROCESS, sync_started_at=timezone.now()
        )
    batch.refresh_from_db()
    return batch


def grant_reprocess(user) -> None:
    user.user_permissions.add(Permission.objects.get(codename="reprocess_usage"))
