"""factory_boy factories for the models and for raw event payloads."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from usage_sync.models import UsageEvent

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
