"""Raw usage, its aggregation into records and batches, and the sync activity log.

The aggregation configuration is in configuration.py, re-exported here with the others.
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Q
from django.db.models.fields.json import KeyTransform
from django.utils import timezone

from .configuration import AggregationConfig, GroupingRule  # noqa: F401 (re-exported)


class RecordStatus(models.TextChoices):
    """Sync status of an aggregated usage record."""

    # Still adding up the events of a window that has not closed; in no batch yet.
    OPEN = "OPEN", "Open"
    PENDING = "PENDING", "Pending"
    COMPLETE = "COMPLETE", "Complete"
    ERROR = "ERROR", "Error"
    IGNORED = "IGNORED", "Ignored"
    INCOMPLETE = "INCOMPLETE", "Incomplete"


class BatchStatus(models.TextChoices):
    """Sync status of an aggregated batch, derived from its records' statuses."""

    PENDING = "PENDING", "Pending"
    IN_PROCESS = "IN_PROCESS", "In process"
    ERROR = "ERROR", "Error"
    COMPLETE = "COMPLETE", "Complete"


# A batch's counters as its records say they should be, per batch (the one home of that
# rule: the recount writes it, reconcile_usage checks it). INCOMPLETE should not occur; if
# it does, it needs an operator like an error.
RECORD_COUNTS_SQL = """
    SELECT b.id AS batch_id, COUNT(r.id) AS total,
           COUNT(r.id) FILTER (WHERE r.status = 'PENDING') AS pending,
           COUNT(r.id) FILTER (WHERE r.status = 'COMPLETE') AS completed,
           COUNT(r.id) FILTER (WHERE r.status IN ('ERROR', 'INCOMPLETE')) AS errors,
           COUNT(r.id) FILTER (WHERE r.status = 'IGNORED') AS ignored
    FROM usage_sync_aggregatedbatch b
    LEFT JOIN usage_sync_usagerecord r ON r.batch_id = b.id
    WHERE {where}
    GROUP BY b.id
"""
# The status those counts give a batch that no sync holds.
STATUS_FROM_COUNTS_SQL = (
    "CASE WHEN c.pending > 0 THEN 'PENDING' WHEN c.errors > 0 THEN 'ERROR' ELSE 'COMPLETE' END"
)
_RECOUNT_SQL = f"""
    UPDATE usage_sync_aggregatedbatch b
    SET total_count = c.total, pending_count = c.pending, completed_count = c.completed,
        error_count = c.errors, ignored_count = c.ignored,
        status = CASE
            WHEN b.status = 'IN_PROCESS' AND NOT %(release)s AND c.pending > 0 THEN b.status
            ELSE {STATUS_FROM_COUNTS_SQL} END,
        updated_at = now()
    FROM ({RECORD_COUNTS_SQL.format(where="b.id = ANY(%(ids)s)")}) c
    WHERE b.id = c.batch_id
"""


class BatchQuerySet(models.QuerySet):
    def incomplete(self):
        """Batches with a PENDING or ERROR record (served by batch_incomplete_idx)."""
        return self.filter(INCOMPLETE)

    def claimable(self, now: datetime):
        """Batches no sync holds: not IN_PROCESS, or claimed so long ago that its worker is
        taken to be dead (SYNC_CLAIM_STALE_SECONDS)."""
        stale = now - timedelta(seconds=settings.SYNC_CLAIM_STALE_SECONDS)
        return self.filter(~Q(status=BatchStatus.IN_PROCESS) | Q(sync_started_at__lt=stale))

    def recount(self, *, release: bool = False) -> None:
        """Recompute these batches' counters from their records, and their status.

        The batch rows are locked first (in id order), then counted in a statement of its
        own: every writer of records holds its batch's row lock, so the count sees all of
        them and none can change it before commit. Two writers can then never leave
        pending_count at 0 while a record is PENDING. A batch keeps IN_PROCESS (its claim)
        unless `release`, and only while it has PENDING records: one with none left would
        never be claimed, swept or reprocessed again, should its sync die before releasing.
        """
        with transaction.atomic():
            ids = list(self.order_by("id").select_for_update().values_list("id", flat=True))
            if not ids:
                return
            with connection.cursor() as cursor:
                cursor.execute(_RECOUNT_SQL, {"ids": ids, "release": release})


# A batch the console lists as incomplete: some record is still PENDING or ERROR.
INCOMPLETE = Q(pending_count__gt=0) | Q(error_count__gt=0)


class AggregatedBatch(models.Model):
    """Up to `batch_size` aggregated records of one window: one bulk_record_usage_m call."""

    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    # 1, 2, … within a window: late events aggregate into later batches of the same window.
    sequence = models.PositiveIntegerField()
    status = models.CharField(
        max_length=16, choices=BatchStatus.choices, default=BatchStatus.PENDING
    )
    # Maintained counters, so list pages never count records row by row.
    total_count = models.PositiveIntegerField(default=0)
    pending_count = models.PositiveIntegerField(default=0)
    completed_count = models.PositiveIntegerField(default=0)
    error_count = models.PositiveIntegerField(default=0)
    ignored_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    # Transport failures so far, and when the sweep may send the batch out again.
    sync_attempts = models.PositiveIntegerField(default=0, db_default=0)
    next_retry_at = models.DateTimeField(null=True, blank=True)
    sync_started_at = models.DateTimeField(null=True, blank=True)
    # The claim of the sync holding the batch (a fencing token): each of its writes checks
    # that the claim is still its own, so a worker whose claim was taken over writes nothing.
    claim_token = models.UUIDField(null=True, blank=True)
    synced_at = models.DateTimeField(null=True, blank=True)

    objects = BatchQuerySet.as_manager()

    class Meta:
        ordering = ["-window_start", "-sequence"]
        constraints = [
            # Aggregation numbers late batches after the existing ones of their window.
            models.UniqueConstraint(
                fields=["window_start", "sequence"], name="batch_unique_window_sequence"
            ),
            models.CheckConstraint(
                condition=Q(
                    total_count=models.F("pending_count")
                    + models.F("completed_count")
                    + models.F("error_count")
                    + models.F("ignored_count")
                ),
                name="batch_counts_add_up",
                violation_error_message="Batch counts must add up to its total.",
            ),
        ]
        indexes = [
            # Incomplete-batch view: batches with PENDING or ERROR records, latest first.
            models.Index(
                fields=["-window_start"], condition=INCOMPLETE, name="batch_incomplete_idx"
            ),
        ]

    def __str__(self):
        return f"Batch {self.pk} ({self.window_start:%Y-%m-%d %H:%M} #{self.sequence})"

    @property
    def is_incomplete(self) -> bool:
        return self.pending_count > 0 or self.error_count > 0


# What makes events add into the same record: the window, the account, the usage type, the
# grouped qualifiers ('' when not grouped), the rate, and whether they are priced upstream
# (an amount given) or rated by Aria: a sum must bill the same money. The open-record key.
RECORD_KEY = (
    "usage_date", "window_end", "client_acct_id", "acct_no", "usage_type_code", "usage_type",
    "qualifier_1", "qualifier_2", "qualifier_3", "qualifier_4", "rate",
)


class UsageRecord(models.Model):
    """An aggregated usage record: the sum of raw events sharing a window and grouping key.

    Ingest adds each event into its window's OPEN record (batch empty); when the window
    closes, aggregation numbers the open records into batches and they become PENDING.
    """

    # Indexed by record_batch_id, which starts with batch_id. Empty while OPEN.
    batch = models.ForeignKey(
        AggregatedBatch, on_delete=models.PROTECT, related_name="records", db_index=False,
        null=True, blank=True,
    )
    # Deterministic and unique: the only way to map bulk_record_usage_m results back.
    # Given when the record's window closes (AU<batch>-<position>); NULL until then, as
    # the unique constraint takes NULLs as distinct and '' would not be.
    client_record_id = models.CharField(max_length=50, null=True, blank=True)  # noqa: DJ001
    client_acct_id = models.CharField(max_length=50, blank=True, default="")
    acct_no = models.BigIntegerField(null=True, blank=True)
    usage_type_code = models.CharField(max_length=30, blank=True, default="")
    usage_type = models.BigIntegerField(null=True, blank=True)
    qualifier_1 = models.CharField(max_length=300, blank=True, default="")
    qualifier_2 = models.CharField(max_length=300, blank=True, default="")
    qualifier_3 = models.CharField(max_length=300, blank=True, default="")
    qualifier_4 = models.CharField(max_length=300, blank=True, default="")
    # Wide enough for the sum of any group: an event is below 10^14 units and 10^16 in
    # amount (ingest's limits), and a record holds fewer than 2^31 events (event_count),
    # so a sum stays below 2.2 * 10^23 units and 2.2 * 10^25 in amount.
    usage_units = models.DecimalField(max_digits=30, decimal_places=6)
    amount = models.DecimalField(max_digits=28, decimal_places=2, null=True, blank=True)
    rate = models.DecimalField(max_digits=18, decimal_places=5, null=True, blank=True)
    usage_date = models.DateTimeField(help_text="Start of the aggregation window.")
    window_end = models.DateTimeField(help_text="End of the aggregation window.")
    event_count = models.PositiveIntegerField()
    status = models.CharField(
        max_length=16, choices=RecordStatus.choices, default=RecordStatus.PENDING
    )
    # Aria's own code and message; codes are opaque values. On a record in doubt, the
    # code and message of an answer that could not be mapped: what it becomes (ERROR) if
    # core Aria turns out not to hold it.
    sync_error_code = models.CharField(max_length=20, blank=True, default="")
    sync_error_message = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    # Set, and committed, just before the record goes out; cleared when the outcome is
    # stored. PENDING with sent_at set means "in doubt": once SYNC_IN_DOUBT_SETTLE_SECONDS
    # have passed, look it up in core Aria before anything is sent again.
    sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            # A constraint, not unique=True: no extra LIKE index to maintain on every insert.
            # Partial, as are the batch and status indexes below: an OPEN record has none
            # of them, and an ingest then writes three index entries per new record, not six.
            models.UniqueConstraint(fields=["client_record_id"], name="record_unique_client_id",
                                    condition=Q(client_record_id__isnull=False)),
            # One open record per key: ingest's ON CONFLICT adds into it. Also how
            # aggregation finds the open records of closed windows (usage_date first).
            models.UniqueConstraint(
                *map(models.F, RECORD_KEY), models.Q(amount__isnull=True),
                condition=Q(batch__isnull=True), nulls_distinct=False, name="record_open_key",
            ),
        ]
        indexes = [
            # A batch's records in id order: the records view and the batch page list
            # them so (records of a batch are not contiguous: a window's open records are
            # opened as events arrive); the sync, the error summary and reprocess read a
            # batch's records through it (at most batch_size rows).
            models.Index(fields=["batch", "id"], name="record_batch_id",
                         condition=Q(batch__isnull=False)),
            # The records view by error code, and by any status but COMPLETE (most records)
            # and OPEN, in id order, without walking the table's id order past millions.
            models.Index(fields=["sync_error_code", "id"], name="record_error_code",
                         condition=~Q(sync_error_code="")),
            models.Index(fields=["status", "id"], name="record_status_id",
                         condition=~Q(status__in=["COMPLETE", "OPEN"])),
            # The sync's records in flight or in doubt (sent_at set): before each send it
            # asks whether a batch has any, which without this walks the whole batch.
            models.Index(fields=["batch"], name="record_sent",
                         condition=Q(sent_at__isnull=False)),
            # Account view and the records filter by account.
            models.Index(fields=["client_acct_id", "status"], name="record_account_status"),
            # The same by Aria account number, and the trail's search for one; most records
            # name the account by client_acct_id only, so the index skips those.
            models.Index(fields=["acct_no"], name="record_acct_no",
                         condition=Q(acct_no__isnull=False)),
        ]

    def __str__(self):
        return self.client_record_id or f"open record {self.pk}"


class UsageEvent(models.Model):
    """A raw usage event as ingested; `event_id` makes re-sends harmless."""

    event_id = models.CharField(max_length=100)
    client_acct_id = models.CharField(max_length=50, blank=True, default="")
    acct_no = models.BigIntegerField(null=True, blank=True)
    usage_type_code = models.CharField(max_length=30, blank=True, default="")
    usage_type = models.BigIntegerField(null=True, blank=True)
    usage_units = models.DecimalField(max_digits=20, decimal_places=6)
    usage_date = models.DateTimeField()
    amount = models.DecimalField(max_digits=18, decimal_places=2, null=True, blank=True)
    rate = models.DecimalField(max_digits=18, decimal_places=5, null=True, blank=True)
    qualifier_1 = models.CharField(max_length=300, blank=True, default="")
    qualifier_2 = models.CharField(max_length=300, blank=True, default="")
    qualifier_3 = models.CharField(max_length=300, blank=True, default="")
    qualifier_4 = models.CharField(max_length=300, blank=True, default="")
    comments = models.TextField(blank=True, default="")
    received_at = models.DateTimeField(default=timezone.now)
    # Set once, by ingest, in the statement that adds the event into its open record (by
    # aggregation for events stored without one, e.g. before records were opened at ingest).
    record = models.ForeignKey(
        UsageRecord, null=True, blank=True, on_delete=models.PROTECT, related_name="events"
    )

    class Meta:
        indexes = [
            # Aggregation selects the not-yet-aggregated events of closed windows.
            models.Index(
                fields=["usage_date"],
                condition=Q(record__isnull=True),
                name="event_unaggregated_idx",
            ),
        ]
        constraints = [
            # Ingest's ON CONFLICT (event_id) guard; a constraint, so no extra LIKE index.
            models.UniqueConstraint(fields=["event_id"], name="event_unique_event_id"),
            models.CheckConstraint(
                condition=~Q(client_acct_id="") | Q(acct_no__isnull=False),
                name="event_has_account",
            ),
            models.CheckConstraint(
                condition=~Q(usage_type_code="") | Q(usage_type__isnull=False),
                name="event_has_usage_type",
            ),
        ]

    def __str__(self):
        return self.event_id


class SyncActivity(models.Model):
    """One entry of the activity log: a sync call, an aggregation run, a reprocess."""

    class Action(models.TextChoices):
        AGGREGATE = "AGGREGATE", "Aggregate"
        BULK_RECORD_USAGE = "BULK_RECORD_USAGE", "Bulk record usage"
        REPROCESS = "REPROCESS", "Reprocess"
        CONFIG_CHANGE = "CONFIG_CHANGE", "Configuration change"
        API_TOKEN_CREATE = "API_TOKEN_CREATE", "API token created"
        API_TOKEN_REVOKE = "API_TOKEN_REVOKE", "API token revoked"

    class Status(models.TextChoices):
        STARTED = "STARTED", "Started"
        COMPLETE = "COMPLETE", "Complete"
        ERROR = "ERROR", "Error"
        PARTIAL = "PARTIAL", "Partial"

    action_name = models.CharField(max_length=50, choices=Action.choices)
    object_name = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=Status.choices)
    batch = models.ForeignKey(
        AggregatedBatch, null=True, blank=True, on_delete=models.SET_NULL, related_name="activity"
    )
    error_code = models.CharField(max_length=20, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    record_count = models.PositiveIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    actor = models.CharField(max_length=150, blank=True, default="system")
    # What was sent or done, with secrets removed (never the auth_key).
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "sync activity"
        indexes = [
            # Activity log filtered by status and date, latest first.
            models.Index(fields=["status", "-created_at"], name="activity_status_created"),
            models.Index(fields=["-created_at"], name="activity_created"),
            # The trail: a call by its receipt id, and the entry of a reprocess run.
            models.Index(KeyTransform("client_receipt_id", "details"), name="activity_receipt",
                         condition=Q(batch__isnull=False)),
            models.Index(KeyTransform("run_id", "details"), name="activity_reprocess_run",
                         condition=Q(action_name="REPROCESS")),
        ]

    def __str__(self):
        return f"{self.action_name} {self.object_name} {self.status}"
