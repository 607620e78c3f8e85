"""Reprocess runs: who queued which records again, and how far they got."""

from django.conf import settings
from django.db import models
from django.db.models import Count
from django.utils import timezone

from usage_sync.models import AggregatedBatch, RecordStatus, UsageRecord


class ReprocessLevel(models.TextChoices):
    """The three levels a reprocess runs at: all, one batch, one error-summary line."""

    ALL = "ALL", "All"
    BATCH = "BATCH", "Batch"
    ERROR_SUMMARY = "ERROR_SUMMARY", "Error summary"


class ReprocessRun(models.Model):
    """One reprocess request: its scope, who asked and why, and what it queued."""

    level = models.CharField(max_length=16, choices=ReprocessLevel.choices)
    # Scope: the batch (BATCH, ERROR_SUMMARY) and the summary group (ERROR_SUMMARY).
    batch = models.ForeignKey(
        AggregatedBatch,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="reprocess_runs",
    )
    error_code = models.CharField(max_length=20, blank=True, default="")
    status = models.CharField(max_length=16, choices=RecordStatus.choices, blank=True, default="")
    actor = models.CharField(max_length=150)
    reason = models.TextField(blank=True, default="")
    # At most this many, from the batch counters when the run was asked for.
    records_expected = models.PositiveIntegerField(default=0)
    batches_expected = models.PositiveIntegerField(default=0)
    # Queued so far; final once queued_at is set.
    records_selected = models.PositiveIntegerField(default=0)
    batches_selected = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    # The last batch id the queueing went through (it goes in id order, chunk by chunk).
    queue_cursor = models.BigIntegerField(default=0)
    queued_at = models.DateTimeField(null=True, blank=True)
    # Set the first time progress is read with the run queued and none of it PENDING.
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        permissions = [("reprocess_usage", "Can reprocess aggregated usage records")]

    def __str__(self):
        return f"Reprocess {self.pk}: {self.object_name}"

    @property
    def object_name(self) -> str:
        """Name the scope as the activity log shows it: "All", "Batch 12 · 1009 · ERROR"."""
        if self.level == ReprocessLevel.ALL:
            return "All"
        parts = [f"Batch {self.batch_id}"]
        if self.level == ReprocessLevel.ERROR_SUMMARY:
            parts += [p for p in (self.error_code, self.status) if p]
        return " · ".join(parts)

    @property
    def is_queued(self) -> bool:
        return self.queued_at is not None

    @property
    def is_finished(self) -> bool:
        return self.finished_at is not None

    def progress(self) -> dict[str, int]:
        """Count the run's records by their current status (one GROUP BY)."""
        counts = dict(
            UsageRecord.objects.filter(reprocess_links__run=self)
            .order_by()
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        return {
            "completed": counts.get(RecordStatus.COMPLETE, 0),
            "errored": counts.get(RecordStatus.ERROR, 0) + counts.get(RecordStatus.INCOMPLETE, 0),
            "pending": counts.get(RecordStatus.PENDING, 0),
            "ignored": counts.get(RecordStatus.IGNORED, 0),
        }

    def mark_finished(self, progress: dict[str, int]) -> None:
        """Stamp finished_at once the run is queued and none of it PENDING (compare-and-set)."""
        if progress["pending"] or self.finished_at or not self.queued_at:
            return
        now = timezone.now()
        if ReprocessRun.objects.filter(
            pk=self.pk, finished_at__isnull=True, queued_at__isnull=False
        ).update(
            finished_at=now
        ):
            self.finished_at = now
        else:
            self.refresh_from_db(fields=["finished_at"])


class ReprocessRunRecord(models.Model):
    """A record a run queued again, with the outcome it had before (kept for the record)."""

    # Indexed by reprocess_link_unique, which starts with run_id.
    run = models.ForeignKey(
        ReprocessRun, on_delete=models.CASCADE, related_name="links", db_index=False
    )
    # Indexed by reprocess_link_record: "is this PENDING record already queued by a run?"
    record = models.ForeignKey(
        UsageRecord, on_delete=models.CASCADE, related_name="reprocess_links", db_index=False
    )
    previous_status = models.CharField(max_length=16, choices=RecordStatus.choices)
    previous_error_code = models.CharField(max_length=20, blank=True, default="")
    previous_error_message = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            # Progress joins a run's links; the constraint's index starts with run_id.
            models.UniqueConstraint(fields=["run", "record"], name="reprocess_link_unique"),
        ]
        indexes = [models.Index(fields=["record"], name="reprocess_link_record")]

    def __str__(self):
        return f"run {self.run_id} · record {self.record_id}"


class ConsolePreference(models.Model):
    """What one console user chose for themselves: the zone the console shows times in."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        primary_key=True,
        on_delete=models.CASCADE,
        related_name="console_preference",
    )
    # An IANA zone name (Europe/Paris); validated against the zones this Python knows.
    time_zone = models.CharField(max_length=64, default="UTC")

    def __str__(self):
        return f"{self.user} in {self.time_zone}"
