"""Property: aggregated units always equal the units of the events they came from."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.django import TestCase

from usage_sync.aggregation import aggregate_usage
from usage_sync.models import AggregatedBatch, AggregationConfig, UsageEvent, UsageRecord

START = datetime(2026, 11, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 10, tzinfo=UTC)

events = st.lists(
    st.fixed_dictionaries(
        {
            "client_acct_id": st.sampled_from(["A", "B", "C"]),
            "usage_type_code": st.sampled_from(["CALLS", "GB"]),
            "qualifier_1": st.sampled_from(["", "eu", "us"]),
            "usage_units": st.decimals(min_value=0, max_value=10**9, places=6),
            "amount": st.none() | st.decimals(min_value=0, max_value=10**6, places=2),
            "rate": st.none() | st.sampled_from([Decimal("0.5"), Decimal("1.25")]),
            # Some events fall after NOW's boundary: they must stay un-aggregated.
            "minutes": st.integers(min_value=0, max_value=13 * 24 * 60),
        }
    ),
    max_size=60,
)


class AggregationSumsTests(TestCase):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        batch=events,
        late=events,
        frequency=st.sampled_from([15, 60, 1440]),
        batch_size=st.integers(1, 7),
        by_qualifier=st.booleans(),
    )
    def test_units_are_conserved_and_nothing_counted_twice(
        self, batch, late, frequency, batch_size, by_qualifier
    ):
        config = AggregationConfig.load()
        config.frequency_minutes = frequency
        config.batch_size = batch_size
        config.group_by_qualifier_1 = by_qualifier
        config.save()

        def store(rows, prefix):
            UsageEvent.objects.bulk_create(
                UsageEvent(
                    event_id=f"{prefix}-{n}",
                    usage_date=START + timedelta(minutes=row["minutes"]),
                    **{k: v for k, v in row.items() if k != "minutes"},
                )
                for n, row in enumerate(rows)
            )

        store(batch, "first")
        aggregate_usage(now=NOW)
        store(late, "late")
        aggregate_usage(now=NOW)
        aggregate_usage(now=NOW)  # a repeated run changes nothing

        linked = UsageEvent.objects.filter(record__isnull=False)
        assert not UsageEvent.objects.filter(record__isnull=True, usage_date__lt=START.replace(
            day=9)).exists()
        totals = UsageRecord.objects.aggregate(u=Sum("usage_units"), n=Sum("event_count"))
        assert totals["u"] == linked.aggregate(u=Sum("usage_units"))["u"]
        assert (totals["n"] or 0) == linked.count()
        for record in UsageRecord.objects.all():
            assert record.usage_units == record.events.aggregate(u=Sum("usage_units"))["u"]
        assert all(
            b.total_count == b.records.count() <= batch_size for b in AggregatedBatch.objects.all()
        )
