"""Health endpoints for orchestrators and load balancers (no login, no secrets).

- /healthz/live: the process answers. No dependency is touched, so a database outage
  does not get every web process restarted.
- /healthz/ready: the process can do its work. PostgreSQL (SELECT 1 on a new
  connection), Redis (PING), the Kafka broker (metadata) and core Aria (any HTTP answer
  from its host) are checked side by side, each bounded by HEALTH_CHECK_TIMEOUT_SECONDS;
  200 when all pass, 503 naming the failed checks and their errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit, urlunsplit

import redis
import requests
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from allegro.logging import redact, redact_url

logger = logging.getLogger(__name__)


def check_database(timeout: float) -> str:
    """Run SELECT 1 on a new connection of the default database."""
    # A connection of its own, closed afterwards: the request's connection (and the
    # thread-local machinery) stays out of it, and a refused new connection shows.
    in_use = connections["default"].settings_dict
    options = dict(in_use.get("OPTIONS", {}))
    if in_use["ENGINE"] == "django.db.backends.postgresql":
        options["connect_timeout"] = max(int(timeout), 2)  # libpq's minimum is 2 s
    wrapper = type(connections["default"])({**in_use, "OPTIONS": options}, "default")
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        wrapper.close()
    return in_use.get("HOST") or in_use["NAME"]


def check_redis(timeout: float) -> str:
    """PING the Celery broker."""
    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        client.ping()
    finally:
        client.close()
    return redact_url(settings.REDIS_URL)


def check_kafka(timeout: float) -> str:
    """Fetch the cluster metadata from the Kafka brokers."""
    admin = AdminClient(
        {
            "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
            "socket.timeout.ms": max(int(timeout * 1000), 1000),
            # Not librdkafka's error line for every connection attempt of every probe
            # while the broker is down: the probe reports the failure itself.
            "log_level": 2,
            "logger": logger,
        }
    )
    metadata = admin.list_topics(timeout=timeout)
    if not metadata.brokers:
        raise KafkaException("the metadata lists no broker")
    return settings.KAFKA_BOOTSTRAP_SERVERS


def core_aria_root() -> str:
    """Return scheme://host[:port]/ of ARIA_API_URL, without any user info."""
    parts = urlsplit(settings.ARIA_API_URL)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, "/", "", ""))


def check_core_aria(timeout: float) -> str:
    """Send a HEAD to core Aria's host: any HTTP answer means it is reachable.

    No auth_key is sent and no API method is called; a 404 or 405 answers as well.
    """
    url = core_aria_root()
    requests.head(url, timeout=timeout, allow_redirects=False).close()
    return url


CHECKS: dict[str, Callable[[float], str]] = {
    "database": check_database,
    "redis": check_redis,
    "kafka": check_kafka,
    "core_aria": check_core_aria,
}


def run_checks(timeout: float) -> dict[str, dict]:
    """Run every check concurrently; return {name: {"ok", "ms", "target" | "error"}}."""
    executor = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="healthz")
    started = time.monotonic()
    futures = {name: executor.submit(_timed, check, timeout) for name, check in CHECKS.items()}
    results = {}
    try:
        for name, future in futures.items():
            left = max(timeout + 0.5 - (time.monotonic() - started), 0.01)
            try:
                results[name] = future.result(timeout=left)
            except FutureTimeout:
                results[name] = {
                    "ok": False,
                    "ms": round((time.monotonic() - started) * 1000),
                    "error": f"no answer within {timeout:g} s",
                }
    finally:
        # A check stuck past its bound finishes in the background; nobody waits for it.
        executor.shutdown(wait=False, cancel_futures=True)
    return results


def _timed(check: Callable[[float], str], timeout: float) -> dict:
    started = time.monotonic()
    try:
        target = check(timeout)
    except Exception as exc:  # every failure is the answer: reported, never raised
        return {
            "ok": False,
            "ms": round((time.monotonic() - started) * 1000),
            "error": redact(f"{type(exc).__name__}: {exc}".strip()),
        }
    return {"ok": True, "ms": round((time.monotonic() - started) * 1000), "target": target}


@never_cache
@require_GET
def live(request: HttpRequest) -> JsonResponse:
    """Answer 200 while the process serves requests."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    """Answer 200 if every dependency answers, else 503 with the failed checks."""
    checks = run_checks(settings.HEALTH_CHECK_TIMEOUT_SECONDS)
    failed = sorted(name for name, result in checks.items() if not result["ok"])
    if not failed:
        return JsonResponse({"status": "ok", "checks": checks})
    logger.warning(
        "not ready: %s",
        "; ".join(f"{name}: {checks[name]['error']}" for name in failed),
        extra={"failed_checks": failed},
    )
    return JsonResponse(
        {"status": "unavailable", "failed": failed, "checks": checks}, status=503
    )
