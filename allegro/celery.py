"""Celery application: Redis broker, tasks discovered in the Django apps."""

import logging.config
import os

from celery import Celery, bootsteps
from celery.signals import setup_logging, worker_process_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "allegro.settings")

app = Celery("allegro")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class SyncConsumers(bootsteps.StartStopStep):
    """Run the worker's Kafka sync consumers beside its pool, for the worker's life."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        from django.conf import settings

        from usage_sync.consumer import ConsumerProcesses

        # Long enough for a call in flight to end (the consumer finishes its batch).
        self.consumers = ConsumerProcesses(
            settings.SYNC_CONSUMERS_PER_WORKER, stop_timeout=settings.ARIA_TIMEOUT_SECONDS + 15,
            worker_name=worker.hostname if settings.KAFKA_STATIC_MEMBERSHIP else "",
        )
        self.check = None

    def start(self, worker):
        from django.conf import settings

        log = logging.getLogger("usage_sync.consumer")
        if not self.consumers.count:
            log.warning("SYNC_CONSUMERS_PER_WORKER is 0: this worker syncs no batches")
            return
        log.info(
            "%d sync consumers (topic %s, group %s) run beside the pool of %s processes, "
            "which stays free for aggregation, the sweep and reprocess",
            self.consumers.count, settings.KAFKA_AGGREGATED_TOPIC,
            settings.KAFKA_CONSUMER_GROUP, worker.concurrency,
        )
        self.consumers.check()
        self.check = worker.timer.call_repeatedly(
            self.consumers.CHECK_EVERY_SECONDS, self.consumers.check
        )

    def stop(self, worker):
        if self.check is not None:
            self.check.cancel()
        self.consumers.stop()

    def terminate(self, worker):
        # Cold shutdown: no waiting for calls in flight; their records stay in doubt.
        if self.check is not None:
            self.check.cancel()
        self.consumers.stop(timeout=3)


app.steps["worker"].add(SyncConsumers)


@setup_logging.connect
def _configure_logging(**kwargs):
    # With a receiver here Celery leaves the root logger alone: worker and beat log with
    # settings.LOGGING (JSON lines in production), like the web processes.
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)


@worker_process_shutdown.connect
def _mark_metrics_process_dead(pid=None, **kwargs):
    # Multiprocess metrics: a pool child's live gauges must stop counting once it is gone.
    from usage_sync import metrics

    metrics.mark_process_dead(pid or os.getpid())
