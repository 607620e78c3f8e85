"""The aggregation configuration (one row) and when an edit of its grouping rule applies.

Defined apart from models.py, which re-exports it, because its rule is about time: an edit
of the frequency or grouping waits for the next window, and until then events are grouped
by the rule in force before it.
"""

import dataclasses
from datetime import UTC, datetime, timedelta

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class GroupingRule:
    """How events are grouped into records: the window length and the grouped qualifiers."""

    frequency_minutes: int
    qualifiers: tuple[int, ...]


class AggregationConfig(models.Model):
    """The one Aggregate usage configuration (pk=1), editable in the console and admin."""

    class Frequency(models.IntegerChoices):
        MIN_5 = 5, "Every 5 minutes"
        MIN_15 = 15, "Every 15 minutes"
        MIN_30 = 30, "Every 30 minutes"
        HOURLY = 60, "Hourly"
        DAILY = 1440, "Daily"

    frequency_minutes = models.PositiveIntegerField(
        choices=Frequency.choices, default=Frequency.HOURLY
    )
    # Account and usage type always group; each qualifier can be added to the key.
    group_by_qualifier_1 = models.BooleanField(default=False)
    group_by_qualifier_2 = models.BooleanField(default=False)
    group_by_qualifier_3 = models.BooleanField(default=False)
    group_by_qualifier_4 = models.BooleanField(default=False)
    batch_size = models.PositiveIntegerField(
        default=1000, validators=[MinValueValidator(1), MaxValueValidator(100_000)]
    )
    lateness_grace_minutes = models.PositiveIntegerField(
        default=5,
        validators=[MaxValueValidator(7 * 24 * 60)],
        help_text="How long after a window ends to wait for stragglers before aggregating it.",
    )
    enabled = models.BooleanField(default=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    # An edit of the frequency or grouping applies from the next window on (`edited`):
    # events dated before `rule_changes_at` keep `previous_rule`, the rule in force when
    # the edit was made, so the records of a window that has started are never mixed.
    rule_changes_at = models.DateTimeField(null=True, blank=True)
    previous_rule = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = "aggregate usage configuration"

    def __str__(self):
        return "Aggregate usage configuration"

    @classmethod
    def load(cls) -> "AggregationConfig":
        """Return the configuration row, creating it with defaults on first use."""
        config, _ = cls.objects.get_or_create(pk=1)
        return config

    @property
    def frequency(self) -> timedelta:
        return timedelta(minutes=self.frequency_minutes)

    @property
    def lateness_grace(self) -> timedelta:
        return timedelta(minutes=self.lateness_grace_minutes)

    @property
    def grouped_qualifiers(self) -> list[int]:
        return [n for n in range(1, 5) if getattr(self, f"group_by_qualifier_{n}")]

    @property
    def rule(self) -> GroupingRule:
        """The frequency and grouping as edited (in force from `rule_changes_at` on)."""
        return GroupingRule(self.frequency_minutes, tuple(self.grouped_qualifiers))

    def rule_at(self, moment: datetime) -> GroupingRule:
        """The rule events dated `moment` are grouped by."""
        if self.rule_changes_at and moment < self.rule_changes_at and self.previous_rule:
            return GroupingRule(
                self.previous_rule["frequency_minutes"], tuple(self.previous_rule["qualifiers"])
            )
        return self.rule

    def edited(self, *, in_force: GroupingRule, now: datetime) -> None:
        """Apply an edit of the frequency or grouping from the next window on.

        `in_force` is `rule_at(now)` from before the edit. The change waits for the next
        start of a window of the longer of the two frequencies (windows are aligned to the
        Unix epoch, and each frequency divides the longer ones), so no window is cut.
        The console and the admin call this; saving the model directly applies at once.
        """
        if self.rule == in_force:
            if self.rule_changes_at and self.rule_changes_at > now:
                # Edited back before the change applied: nothing changes.
                self.rule_changes_at, self.previous_rule = None, {}
            return
        step = timedelta(minutes=max(self.rule.frequency_minutes, in_force.frequency_minutes))
        # The next boundary at or after `now`, to the microsecond: a window just begun
        # keeps the rule its first events were grouped by.
        self.rule_changes_at = _EPOCH + -((_EPOCH - now) // step) * step
        self.previous_rule = {
            "frequency_minutes": in_force.frequency_minutes,
            "qualifiers": list(in_force.qualifiers),
        }

    def is_due(self, now) -> bool:
        """Tell whether the scheduler should aggregate now: once a window of the shorter
        of the rules in force ended (hourly windows still close hourly while a change to
        daily waits for midnight, and after it the last of them)."""
        if not self.enabled:
            return False
        minutes = min(self.frequency_minutes,
                      self.previous_rule.get("frequency_minutes", self.frequency_minutes))
        return self.last_run_at is None or now - self.last_run_at >= timedelta(minutes=minutes)
