"""Log formatting: one JSON object per line in production, readable lines in development.

Both formatters carry the `extra` fields the code passes (batch_id, client_receipt_id,
duration_ms, …): as JSON keys, or as a `key=value` suffix in text mode. Both redact
secrets (the core Aria auth key, the Django secret key, passwords of the database and
Redis URLs) from the whole formatted line, tracebacks included, so a secret that slipped
into a message or an exception never reaches the log output.

`logging_config()` builds the dictConfig used by Django (settings.LOGGING), by Celery
worker and beat (allegro/celery.py), and by gunicorn (allegro/gunicorn_conf.py).
"""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import urlsplit, urlunsplit

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

REDACTED = "***"
# Shorter values (an empty password, a test key "x") would redact unrelated text.
MIN_SECRET_LENGTH = 4
# LogRecord attributes that are not `extra` fields ("color_message" is uvicorn's,
# "taskName" Python 3.12's; neither is information).
_NOT_EXTRA = frozenset(RESERVED_ATTRS) | {"taskName", "color_message"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def secret_values() -> list[str]:
    """Return the secret strings that must never appear in log output, longest first."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        values = [
            settings.ARIA_AUTH_KEY,
            settings.SECRET_KEY,
            urlsplit(settings.REDIS_URL).password,
            *(db.get("PASSWORD") for db in settings.DATABASES.values()),
        ]
    except ImproperlyConfigured:
        # Logging before Django is configured (gunicorn's master at start): the same
        # values, read from the environment the settings would read them from.
        values = [
            os.environ.get("ARIA_AUTH_KEY"),
            os.environ.get("SECRET_KEY"),
            urlsplit(os.environ.get("REDIS_URL", "")).password,
            urlsplit(os.environ.get("DATABASE_URL", "")).password,
        ]
    found = {v for v in values if v and len(v) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """Replace every secret value in `text` (also as it appears inside JSON strings)."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
        escaped = json.dumps(secret)[1:-1]
        if escaped != secret:
            text = text.replace(escaped, REDACTED)
    return text


def redact_url(url: str) -> str:
    """Return the URL with its password (if any) replaced: safe to show or log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}{REDACTED}@{netloc}"))


def extra_fields(record: logging.LogRecord) -> dict:
    """Return the fields passed with `extra=` on the logging call."""
    return {k: v for k, v in record.__dict__.items() if k not in _NOT_EXTRA}


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: time, level, logger, message, extra fields, exc_info."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", "time")
        super().__init__("{levelname}{name}{message}", *args, style="{", **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class TextFormatter(logging.Formatter):
    """A readable line, then the extra fields as `key=value` pairs."""

    def __init__(self, fmt: str = TEXT_FORMAT, *args, **kwargs):
        super().__init__(fmt, *args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = extra_fields(record)
        if extras:
            suffix = " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
            head, newline, traceback = line.partition("\n")
            line = f"{head} {suffix}{newline}{traceback}"
        return redact(line)


def _text_value(value) -> str:
    text = "" if value is None else str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class RoutineCeleryLines(logging.Filter):
    """Drop Celery's routine INFO lines: each task received and succeeded (with its data
    dict) and each task beat sends, several every few seconds, forever. Failures, retries
    and everything of ours stay; LOG_LEVEL=DEBUG shows these too."""

    # Logger name -> the message prefix that marks its routine lines ("": all of them).
    ROUTINE = {
        "celery.worker.strategy": "",
        "celery.app.trace": "",
        "celery.beat": "Scheduler: Sending due task",
    }

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = self.ROUTINE.get(record.name)
        if prefix is None or record.levelno != logging.INFO:
            return True
        return not str(record.msg).startswith(prefix)


def default_log_format(*, debug: bool) -> str:
    """JSON in production, text when developing."""
    return "text" if debug else "json"


def logging_config(*, log_format: str, level: str) -> dict:
    """Return the dictConfig for every process: one stream handler on the root logger."""
    if log_format not in ("json", "text"):
        raise ValueError(f"LOG_FORMAT must be 'json' or 'text', not {log_format!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "allegro.logging.JsonFormatter"},
            "text": {"()": "allegro.logging.TextFormatter"},
        },
        "filters": {"routine": {"()": "allegro.logging.RoutineCeleryLines"}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": log_format,
                "filters": [] if level.upper() == "DEBUG" else ["routine"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        # Django's default config and gunicorn's give these loggers handlers of their
        # own; without them every line reaches the root handler once, formatted alike.
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("django", "django.server", "gunicorn.error", "gunicorn.access")
        },
    }
