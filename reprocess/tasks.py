"""Celery tasks of reprocess: thin wrappers over reprocess.py."""

import logging

from celery import shared_task
from django.conf import settings

from . import reprocess

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def queue_reprocess_run(run_id: int) -> None:
    """Queue a run's records, chunk by chunk (a second delivery finds nothing left)."""
    reprocess.queue_run(run_id)


@shared_task(ignore_result=True)
def resume_reprocess_runs() -> None:
    """Finish the queueing of runs whose task died or was never delivered."""
    for run_id in reprocess.unqueued_runs(
        older_than_seconds=settings.REPROCESS_RESUME_AFTER_SECONDS
    ):
        logger.warning("reprocess run %s is still queueing; resuming it", run_id)
        reprocess.queue_run(run_id)
