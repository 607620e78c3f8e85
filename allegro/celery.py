"""Celery application: Redis broker, tasks discovered in the Django apps."""

import logging.config
import os

from celery import Celery
from celery.signals import setup_logging, worker_process_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "allegro.settings")

app = Celery("allegro")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


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
