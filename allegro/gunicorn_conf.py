"""gunicorn settings for the web service:

    gunicorn -c python:allegro.gunicorn_conf allegro.wsgi:application --bind 0.0.0.0:8000

- Logs: gunicorn's error and access lines go through settings.LOGGING, one JSON object
  per line in production like the application's (no --access-logfile needed: with a
  logging config gunicorn logs every request to the `gunicorn.access` logger).
- Metrics: with PROMETHEUS_MULTIPROC_DIR set, a worker that exits is marked dead, so its
  live gauges stop counting (its counters stay summed, as counters must).
"""

from allegro import settings as _settings

logconfig_dict = _settings.LOGGING


def child_exit(server, worker):
    from usage_sync import metrics

    metrics.mark_process_dead(worker.pid)
