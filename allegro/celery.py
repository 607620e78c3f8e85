"""Celery application: Redis broker, tasks discovered in the Django apps."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "allegro.settings")

app = Celery("allegro")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
