"""Multiprocess metrics: what other processes (Celery pool children, gunicorn workers)
count reaches /metrics of this one through PROMETHEUS_MULTIPROC_DIR."""

import subprocess
import sys
import textwrap

import pytest

from tests.services import ROOT

pytestmark = pytest.mark.django_db


def run_in_other_process(code: str, metrics_dir) -> None:
    """Run Python code in a fresh interpreter that writes its metrics to `metrics_dir`."""
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DJANGO_SETTINGS_MODULE": "allegro.settings",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
        check=True,
        timeout=60,
    )


@pytest.fixture
def metrics_dir(tmp_path, monkeypatch, broker_down):
    path = tmp_path / "prometheus"
    path.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    return path


def test_counters_of_other_processes_are_summed(metrics_dir, scrape):
    count_events = """
        from usage_sync import metrics
        metrics.EVENTS_INGESTED.inc({n})
        metrics.observe_call("bulk_record_usage_m", 0.2, "1009")
    """
    run_in_other_process(count_events.format(n=7), metrics_dir)
    run_in_other_process(count_events.format(n=5), metrics_dir)

    metrics = scrape()

    assert metrics.total("allegro_events_ingested_total") == 12
    assert metrics.total("allegro_aria_calls_total", rest_call="bulk_record_usage_m",
                         error_code="1009") == 2
    assert metrics.total("allegro_aria_call_seconds_bucket", rest_call="bulk_record_usage_m",
                         le="0.25") == 2
    assert metrics.total("allegro_aria_call_seconds_bucket", rest_call="bulk_record_usage_m",
                         le="0.1") == 0
    # The scrape-time values are there as well, once.
    assert metrics.total("allegro_collector_up", collector="database") == 1


def test_a_celery_pool_child_that_exits_is_marked_dead(metrics_dir, scrape):
    # A live gauge of a process that exited must stop counting; the worker_process_shutdown
    # receiver in allegro/celery.py does that for each pool child.
    run_in_other_process(
        """
        import os
        from usage_sync import metrics  # noqa: F401 (as every app process does, first)
        from prometheus_client import Gauge
        busy = Gauge("allegro_test_busy", "test", multiprocess_mode="livesum")
        busy.set(3)
        from celery.signals import worker_process_shutdown
        import allegro.celery  # noqa: F401 (connects the receiver)
        worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        """,
        metrics_dir,
    )

    assert not scrape().has("allegro_test_busy")
    assert not list(metrics_dir.glob("gauge_livesum_*.db"))


def test_without_the_shutdown_signal_the_live_gauge_would_stay(metrics_dir, scrape):
    # The control for the test above: the gauge file is what the receiver removes.
    run_in_other_process(
        """
        from usage_sync import metrics  # noqa: F401
        from prometheus_client import Gauge
        Gauge("allegro_test_busy", "test", multiprocess_mode="livesum").set(3)
        """,
        metrics_dir,
    )

    assert scrape().total("allegro_test_busy") == 3


def test_files_are_named_after_host_and_pid(metrics_dir):
    # docker-compose shares the directory between containers, whose pids repeat: the
    # host name (the container id) keeps a web and a worker process off the same file.
    import socket

    run_in_other_process(
        """
        import os, pathlib
        from usage_sync import metrics
        metrics.EVENTS_INGESTED.inc()
        pathlib.Path(os.environ["PROMETHEUS_MULTIPROC_DIR"], "pid").write_text(str(os.getpid()))
        """,
        metrics_dir,
    )

    pid = (metrics_dir / "pid").read_text()
    host = socket.gethostname().replace("_", "-")
    assert [p.name for p in metrics_dir.glob("counter_*.db")] == [f"counter_{host}-{pid}.db"]
