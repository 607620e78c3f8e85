"""The claim a sync holds on a batch: a fencing token that every one of its writes checks.

Taking a claim is a compare-and-set on the batch row (`AggregatedBatch.objects.claimable`):
a second delivery of the same batch id finds it held and does nothing. A claim that grew
stale (its worker died, or froze) may be taken over; the worker that held it may still wake
up, with an answer from core Aria in hand. So no write of a sync trusts that its claim still
stands: each runs in `Claim.fenced()`, a transaction that first locks the batch row with
this claim's token and raises ClaimLost if another claim replaced it. A long sync renews
its claim before each call to core Aria, so the claim goes stale only if one call outlives
SYNC_CLAIM_STALE_SECONDS, which the settings keep longer than ARIA_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from . import metrics
from .models import AggregatedBatch, BatchStatus


class ClaimLost(Exception):
    """Another sync took the batch over: this one must stop without writing."""


@dataclasses.dataclass(frozen=True)
class Claim:
    batch_id: int
    token: uuid.UUID
    # Milliseconds from the batch id's last publish to this claim (None: never published).
    publish_to_claim_ms: int | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def take(cls, batch_id: int) -> Claim | None:
        """Claim the batch if it has PENDING records and no live claim; else None."""
        # Read first: nothing may fail between taking the claim and handing it back.
        published_at = (
            AggregatedBatch.objects.filter(id=batch_id).values_list("published_at", flat=True)
        ).first()
        now = timezone.now()
        token = uuid.uuid4()
        taken = (
            AggregatedBatch.objects.claimable(now)
            .filter(id=batch_id, pending_count__gt=0)
            .update(status=BatchStatus.IN_PROCESS, claim_token=token, sync_started_at=now,
                    updated_at=now)
        )
        if not taken:
            return None
        if published_at is None:
            return cls(batch_id, token)
        waited = max((now - published_at).total_seconds(), 0.0)
        metrics.PUBLISH_TO_CLAIM.observe(waited)
        return cls(batch_id, token, round(waited * 1000))

    @contextmanager
    def fenced(self) -> Iterator[AggregatedBatch]:
        """A transaction holding the batch row under this claim; ClaimLost if it is gone.

        Everything written inside commits only while the claim is this one's: a takeover
        either happened before (ClaimLost, nothing written) or waits for the commit.
        """
        with transaction.atomic():
            batch = (
                AggregatedBatch.objects.select_for_update()
                .filter(id=self.batch_id, claim_token=self.token)
                .first()
            )
            if batch is None:
                raise ClaimLost(f"batch {self.batch_id}: another sync took it over")
            yield batch

    def renew(self) -> None:
        """Restart the claim's clock (before each call to core Aria)."""
        with self.fenced():
            AggregatedBatch.objects.filter(id=self.batch_id).update(sync_started_at=timezone.now())

    def release(self, *, retry_at: datetime | None = None, attempts: int | None = None,
                finished: bool = False) -> None:
        """Recount the batch and let it go: `retry_at` is when the sweep sends it again;
        `finished` stamps a completed sync. Must run inside `fenced()`."""
        now = timezone.now()
        batch = AggregatedBatch.objects.filter(id=self.batch_id)
        batch.recount(release=True)
        changes = {"claim_token": None, "next_retry_at": retry_at, "updated_at": now}
        if attempts is not None:
            changes["sync_attempts"] = attempts
        if finished:
            # A later failure starts its backoff afresh.
            changes.update(synced_at=now, sync_attempts=0)
        batch.update(**changes)
