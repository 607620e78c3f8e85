"""Progress bars of the long commands: a bar on a terminal, a clean summary otherwise."""

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from allegro.progress import progress
from reprocess.models import ReprocessRun
from tests.devtools.commands import command_database_exists, own_database_name
from tests.factories import UsageEventFactory, make_batch
from usage_sync.models import RecordStatus, UsageRecord

NOW = datetime(2026, 11, 21, 0, 10, tzinfo=UTC)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def make_stderr_a_terminal(monkeypatch) -> FakeTerminal:
    """Make stderr a terminal, as an operator's shell is (inside the test: pytest puts its
    own capture back on sys.stderr between setup and call)."""
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def command(name: str, *args) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


# --- the helper ----------------------------------------------------------------------------


def test_the_helper_writes_nothing_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    with progress("Working", total=3, stream=stream) as advance:
        advance(2, note="half")
        advance()
    assert stream.getvalue() == ""


def test_the_helper_draws_a_bar_with_the_note_when_forced():
    stream = io.StringIO()
    with progress("Working", total=3, unit="step", stream=stream, force=True) as advance:
        advance(0, note="stage")
        advance(3, note="link")
    output = stream.getvalue()
    assert "Working: 100%" in output
    assert "3/3" in output
    assert "link" in output
    assert "\r" in output


def test_the_helper_draws_a_bar_on_a_terminal_without_being_forced():
    stream = FakeTerminal()
    with progress("Working", total=2, stream=stream) as advance:
        advance(2)
    assert "Working: 100%" in stream.getvalue()


# --- aggregate_usage -------------------------------------------------------------------------


@pytest.mark.django_db
def test_aggregate_usage_prints_one_summary_line_and_no_bar_off_a_terminal(capsys, published):
    for minute in (0, 20):
        UsageEventFactory(client_acct_id="A", usage_date=NOW - timedelta(hours=2, minutes=minute))

    output = command("aggregate_usage", "--until", NOW.isoformat())

    assert output.count("\n") == 1
    assert output.startswith("Aggregated 2 events into ")
    assert "\r" not in output
    # Log lines may go to stderr; a bar may not.
    err = capsys.readouterr().err
    assert "Aggregating" not in err and "\r" not in err


@pytest.mark.django_db
def test_aggregate_usage_moves_its_bar_once_per_step_on_a_terminal(monkeypatch, published):
    terminal = make_stderr_a_terminal(monkeypatch)
    UsageEventFactory(client_acct_id="A", usage_date=NOW - timedelta(hours=2))

    output = command("aggregate_usage", "--until", NOW.isoformat())

    assert output.startswith("Aggregated 1 events into 1 records in 1 batches")
    bar = terminal.getvalue()
    assert "Aggregating: 100%" in bar
    assert "5/5" in bar
    assert "done" in bar


@pytest.mark.django_db
def test_aggregate_usage_fills_its_bar_when_there_is_nothing_to_aggregate(monkeypatch, published):
    terminal = make_stderr_a_terminal(monkeypatch)
    output = command("aggregate_usage", "--until", NOW.isoformat())

    assert output.startswith("Aggregated 0 events into 0 records in 0 batches")
    assert "5/5" in terminal.getvalue()


# --- reprocess --wait ----------------------------------------------------------------------


def settle_between_polls(monkeypatch, *, per_poll: int, status=RecordStatus.COMPLETE):
    """Stand in for the workers: each poll's sleep settles `per_poll` PENDING records."""
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        ids = list(
            UsageRecord.objects.filter(status=RecordStatus.PENDING)
            .order_by("id")
            .values_list("id", flat=True)[:per_poll]
        )
        UsageRecord.objects.filter(id__in=ids).update(status=status)

    monkeypatch.setattr("reprocess.management.commands.reprocess.time.sleep", fake_sleep)
    return sleeps


@pytest.mark.django_db
def test_reprocess_wait_prints_a_plain_summary_once_the_workers_settled_the_run(
    published, monkeypatch, capsys
):
    make_batch(complete=1, errors={"1009": 3})
    sleeps = settle_between_polls(monkeypatch, per_poll=2)

    output = command("reprocess", "--all", "--wait", "--poll-interval", "0.5")

    run = ReprocessRun.objects.get()
    lines = output.splitlines()
    assert lines[0] == f"Reprocess run {run.pk} (All): queued 3 records in 1 batches."
    assert lines[1].startswith(f"Reprocess run {run.pk} settled in ")
    assert lines[1].endswith(": 3 complete, 0 error, 0 ignored.")
    assert len(lines) == 2
    assert sleeps == [0.5, 0.5]
    err = capsys.readouterr().err
    assert f"Run {run.pk}" not in err and "\r" not in err
    run.refresh_from_db()
    assert run.finished_at is not None


@pytest.mark.django_db
def test_reprocess_wait_shows_records_settled_on_a_terminal(published, monkeypatch):
    terminal = make_stderr_a_terminal(monkeypatch)
    make_batch(errors={"1009": 4})
    settle_between_polls(monkeypatch, per_poll=3, status=RecordStatus.ERROR)

    output = command("reprocess", "--all", "--wait")

    run = ReprocessRun.objects.get()
    assert output.splitlines()[-1].endswith(": 0 complete, 4 error, 0 ignored.")
    bar = terminal.getvalue()
    assert f"Run {run.pk}: 100%" in bar
    assert "4/4" in bar
    assert "0 complete, 4 error" in bar


@pytest.mark.django_db
def test_reprocess_wait_gives_up_after_the_timeout_and_says_what_is_left(
    published, monkeypatch
):
    make_batch(errors={"1009": 2})
    settle_between_polls(monkeypatch, per_poll=0)
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr(
        "reprocess.management.commands.reprocess.time.monotonic", lambda: next(clock)
    )

    with pytest.raises(CommandError, match="2 of 2 records still PENDING after 60 s"):
        command("reprocess", "--all", "--wait", "--timeout", "60")


@pytest.mark.django_db
def test_reprocess_wait_refuses_a_dry_run(published):
    make_batch(errors={"1009": 1})
    with pytest.raises(CommandError, match="nothing to wait for"):
        command("reprocess", "--all", "--wait", "--dry-run")


# --- bench ---------------------------------------------------------------------------------


def test_bench_draws_its_bar_on_a_terminal_stderr_and_keeps_stdout_json_lines():
    name = own_database_name("bench")
    main, child = pty.openpty()
    # A terminal of 120 columns (a fresh pty has none, and tqdm would draw an empty bar).
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "manage.py", "bench", "--only", "console", "--records", "300",
         "--database-name", name],
        cwd=settings.BASE_DIR, env=os.environ, stdout=subprocess.PIPE, stderr=child,
        text=True,
    )
    os.close(child)
    terminal = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the pty closes when the last writer exits
            break
        if not chunk:
            break
        terminal += chunk
    stdout = process.stdout.read()
    assert process.wait(timeout=120) == 0, terminal.decode(errors="replace")
    os.close(main)

    [result] = [json.loads(line) for line in stdout.splitlines()]
    assert result["benchmark"] == "console_pages"
    screen = terminal.decode(errors="replace")
    assert "Benchmarks: 100%" in screen
    assert "1/1" in screen
    # The note names the phase under way.
    assert "console: seeding 300 records" in screen
    assert "console: timing the pages" in screen
    assert not command_database_exists(name)


def test_bench_writes_no_bar_when_stderr_is_not_a_terminal():
    name = own_database_name("bench")
    run = subprocess.run(
        [sys.executable, "manage.py", "bench", "--only", "console", "--records", "300",
         "--database-name", name],
        cwd=settings.BASE_DIR, env=os.environ, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["benchmark"] == "console_pages"
    assert "Benchmarks:" not in run.stderr
    assert "\r" not in run.stderr
