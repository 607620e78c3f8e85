import gzip
import io
import json
import sys
import tracemalloc
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from prometheus_client import REGISTRY

from usage_sync import usage_files
from usage_sync.models import UsageEvent

pytestmark = pytest.mark.django_db


def event(n: int, **fields) -> dict:
    return {
        "event_id": f"evt-{n:06d}",
        "client_acct_id": "ACME-001",
        "usage_type_code": "API_CALLS",
        "usage_units": "12.5",
        "usage_date": "2026-11-24T10:15:00Z",
    } | fields


def write_jsonl(path, events) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def run(path, **options) -> str:
    out = io.StringIO()
    call_command("ingest_usage", str(path), stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def import_error(path, **options) -> str:
    with pytest.raises(CommandError) as raised:
        run(path, **options)
    return str(raised.value)


def test_it_imports_a_jsonl_file(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(1), event(2, acct_no=42, client_acct_id=None, amount=3.25)])

    output = run(path)

    assert "2 events, 2 created, 0 duplicates, 0 errors" in output
    assert "events/s" in output
    stored = UsageEvent.objects.get(event_id="evt-000002")
    assert stored.acct_no == 42
    assert stored.client_acct_id == ""
    assert stored.amount == Decimal("3.25")
    assert stored.usage_units == Decimal("12.5")


def test_it_imports_a_csv_file_reading_empty_cells_as_absent(tmp_path):
    path = tmp_path / "usage.csv"
    path.write_text(
        "event_id,client_acct_id,acct_no,usage_type,usage_units,usage_date,amount,comments\n"
        "evt-1,ACME-001,,7,10,2026-11-24T10:15:00,,\n"
        'evt-2,,1001,7,0.5,2026-11-24T11:00:00+01:00,4.10,"spans\ntwo lines, with a comma"\n'
    )

    output = run(path)

    assert "2 events, 2 created" in output
    first, second = UsageEvent.objects.order_by("event_id")
    assert (first.client_acct_id, first.acct_no, first.amount) == ("ACME-001", None, None)
    assert (second.acct_no, second.usage_type, second.amount) == (1001, 7, Decimal("4.10"))
    assert second.comments == "spans\ntwo lines, with a comma"
    assert second.usage_date.isoformat() == "2026-11-24T10:00:00+00:00"


def test_reimporting_counts_duplicates_and_stores_nothing_twice(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(n) for n in range(7)])
    run(path)

    output = run(path)

    assert "7 events, 0 created, 7 duplicates" in output
    assert UsageEvent.objects.count() == 7


@pytest.mark.parametrize("where", ["while copying", "after the insert"])
def test_a_crash_midway_stores_nothing_and_a_rerun_imports_the_whole_file(
    tmp_path, monkeypatch, where
):
    path = tmp_path / "usage.jsonl"
    # Rows of 4 KB: the first ones have left psycopg's 32 KB buffer for the server by the
    # time line 15 is read.
    write_jsonl(path, [event(n, comments="x" * 3900) for n in range(20)])
    real_validate, real_count = usage_files.validate_row, usage_files.count_ingested_on_commit

    def crash_on_line_15(number, raw):
        if number == 15:
            raise RuntimeError("killed")
        return real_validate(number, raw)

    def crash(created, duplicates):
        raise RuntimeError("killed")

    if where == "while copying":
        monkeypatch.setattr(usage_files, "validate_row", crash_on_line_15)
    else:
        monkeypatch.setattr(usage_files, "count_ingested_on_commit", crash)
    with pytest.raises(RuntimeError):
        run(path)
    assert UsageEvent.objects.count() == 0
    monkeypatch.setattr(usage_files, "validate_row", real_validate)
    monkeypatch.setattr(usage_files, "count_ingested_on_commit", real_count)

    output = run(path)

    assert "20 events, 20 created, 0 duplicates" in output
    assert UsageEvent.objects.count() == 20


def test_an_event_id_reused_with_other_content_names_the_line_and_stores_nothing(tmp_path):
    write_jsonl(tmp_path / "first.jsonl", [event(1), event(2)])
    run(tmp_path / "first.jsonl")
    path = tmp_path / "second.jsonl"
    write_jsonl(path, [
        event(3), event(4),  # a first chunk that would have been stored
        event(1),  # the same event again: a duplicate, fine
        event(2, usage_units="13", usage_date="2026-11-24T11:15:00Z"),  # a correction
        event(5), event(5, client_acct_id="ACME-002"),  # one id, two events in this file
    ])

    message = import_error(path)

    assert "nothing was stored" in message
    assert "line 4, event_id 'evt-000002': differs in usage_units, usage_date" in message
    assert "line 6, event_id 'evt-000005': differs in client_acct_id" in message
    assert UsageEvent.objects.count() == 2
    assert UsageEvent.objects.get(event_id="evt-000002").usage_units == Decimal("12.5")


def test_it_stores_the_whole_file_with_one_insert_statement(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(n) for n in range(600)])
    statements = []

    def record(execute, sql, params, many, context):
        statements.append(" ".join(sql.split()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        run(path)

    # The rows themselves go through COPY, which no execute wrapper sees; the events and
    # their open records are written by ingest's one statement, whatever the file's size.
    assert sum("INSERT INTO usage_sync_usageevent" in sql for sql in statements) == 1
    assert UsageEvent.objects.count() == 600
    assert not UsageEvent.objects.filter(record__isnull=True).exists()


def test_one_bad_line_stores_nothing_and_names_the_line_and_field(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(
        path,
        [
            event(1),
            event(2),
            event(3, usage_units="-4"),
            event(4),
            event(5, usage_date="24/11/2026"),
        ],
    )

    # Lines 1 and 2 were copied into the stage before line 3 was read.
    message = import_error(path)

    assert "nothing was stored" in message
    assert "line 3, usage_units: Must not be negative." in message
    assert "line 5, usage_date: '24/11/2026' is not an ISO 8601 date-time." in message
    assert "2 of 5 events invalid" in message
    assert not UsageEvent.objects.exists()


def test_a_csv_row_error_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "usage.csv"
    path.write_text(
        "event_id,client_acct_id,usage_type_code,usage_units,usage_date,comments\n"
        'evt-1,ACME,CALLS,-1,2026-11-24T10:00:00Z,"one\ntwo\nthree"\n'
        "\n"
        "evt-2,ACME,,1,2026-11-24T10:00:00Z,\n"
        "evt-3,ACME,CALLS,1\n"
    )

    message = import_error(path)

    assert "line 2, usage_units: Must not be negative." in message
    assert "line 6, usage_type_code: One of usage_type_code or usage_type is required." in message
    assert "line 7, line: Has 4 cells; the header has 6 columns." in message
    assert not UsageEvent.objects.exists()


def test_it_reads_a_csv_saved_by_excel_with_a_bom_and_crlf(tmp_path):
    path = tmp_path / "usage.csv"
    path.write_bytes(
        b"\xef\xbb\xbfevent_id,client_acct_id,usage_type_code,usage_units,usage_date\r\n"
        b"evt-1,ACME,CALLS,1,2026-11-24T10:00:00Z\r\n"
    )

    assert "1 created" in run(path)


def test_an_overlong_line_is_an_error_and_the_lines_after_it_are_still_checked(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(usage_files, "MAX_LINE_BYTES", 300)
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(1), event(2, comments="x" * 1000), event(3, usage_units="")])

    message = import_error(path)

    assert "line 2, line: Longer than 300 bytes." in message
    assert "line 3, usage_units: This field is required." in message


def test_an_unknown_csv_column_is_named(tmp_path):
    path = tmp_path / "usage.csv"
    path.write_text(
        "event_id,client_acct_id,usage_type_code,usage_units,usage_date,colour\n"
        "evt-1,ACME,CALLS,1,2026-11-24T10:00:00Z,\n"
    )

    message = import_error(path)

    assert "line 1, colour: Unknown column." in message
    assert not UsageEvent.objects.exists()


def test_an_invalid_json_line_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "usage.ndjson"
    path.write_text(
        json.dumps(event(1))
        + "\n\n"
        + '{"event_id": "evt-2",\n'
        + "[1, 2]\n"
        + json.dumps(event(5))
    )

    message = import_error(path)

    assert "line 3, line: Not valid JSON" in message
    assert "line 4, non_field_errors: Each event must be a JSON object." in message
    assert "2 of 4 events invalid" in message
    assert not UsageEvent.objects.exists()


def test_it_prints_only_the_first_errors_and_says_how_many_more(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(n, usage_units="x") for n in range(1, 11)])

    message = import_error(path, max_errors=3)

    assert message.count("usage_units: 'x' is not a number.") == 3
    assert "line 4," not in message
    assert "… and 7 more errors." in message


def test_it_imports_gzip_files(tmp_path):
    path = tmp_path / "usage.csv.gz"
    with gzip.open(path, "wt") as file:
        file.write("event_id,acct_no,usage_type,usage_units,usage_date\n")
        file.writelines(f"evt-{n},1001,7,{n},2026-11-24T10:00:00Z\n" for n in range(50))

    output = run(path)

    assert "50 events, 50 created" in output
    assert UsageEvent.objects.count() == 50


def test_a_truncated_gzip_file_is_an_error(tmp_path):
    path = tmp_path / "usage.jsonl.gz"
    data = gzip.compress("".join(json.dumps(event(n)) + "\n" for n in range(500)).encode())
    path.write_bytes(data[: len(data) // 2])

    message = import_error(path)

    assert "file: Cannot read the file" in message
    assert not UsageEvent.objects.exists()


def test_it_reads_standard_input_with_an_explicit_format(monkeypatch):
    data = "".join(json.dumps(event(n)) + "\n" for n in range(3)).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    output = run("-", format="jsonl")

    assert "3 events, 3 created" in output


def test_the_format_option_wins_over_the_extension(tmp_path):
    path = tmp_path / "export.txt"
    write_jsonl(path, [event(1)])

    assert "Cannot tell the format" in import_error(path)
    assert "1 created" in run(path, format="jsonl")


def test_a_missing_file_is_a_clear_error(tmp_path):
    message = import_error(tmp_path / "nowhere.csv")

    assert message == f"{tmp_path / 'nowhere.csv'}: no such file."


def test_check_only_validates(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(1)])

    output = run(path, check=True)

    assert "all valid" in output
    assert not UsageEvent.objects.exists()


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_it_shows_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(n) for n in range(10)])
    run(path)
    assert "Importing" not in capsys.readouterr().err

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(path)
    run(path, check=True)

    # One pass, one bar: the file is validated and copied at once.
    assert "Importing: 100%" in terminal.getvalue()
    assert "Checking: 100%" in terminal.getvalue()


def test_memory_stays_bounded_on_a_large_file(tmp_path):
    # ~30 MB of events whose comments are nearly 4 KB each: a reader that held the file,
    # or a list of all its events, would need well over the bound.
    path = tmp_path / "large.jsonl"
    comment = "x" * 3900
    with path.open("w") as file:
        for n in range(7500):
            file.write(json.dumps(event(n, comments=comment)) + "\n")
    assert path.stat().st_size > 29_000_000

    tracemalloc.start()
    try:
        output = run(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert "7,500 events, 7,500 created" in output
    assert peak < 8_000_000, f"peak traced memory {peak:,} bytes"


def test_the_debug_query_log_does_not_grow_with_the_file(tmp_path, settings):
    # With DEBUG on, Django logs every statement it runs: the rows must not be in one.
    settings.DEBUG = True
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(n) for n in range(2000)])

    run(path)

    assert len(connection.queries) < 20
    assert sum(len(query["sql"]) for query in connection.queries) < 10_000


def test_the_same_event_twice_in_a_file_is_stored_once_and_counted_as_a_duplicate(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(1), event(2), event(1), event(1, usage_units="12.50")])

    output = run(path)

    # 12.50 is 12.5: the same content written otherwise.
    assert "4 events, 2 created, 2 duplicates" in output
    assert UsageEvent.objects.count() == 2


def test_one_event_id_twice_in_a_file_with_other_content_names_the_later_line(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(1), event(2), event(1, usage_units="13", qualifier_1="eu")])

    message = import_error(path)

    assert "1 events reuse an event_id" in message
    assert "line 3, event_id 'evt-000001': differs in usage_units, qualifier_1" in message
    assert not UsageEvent.objects.exists()


def test_it_prints_the_first_conflicts_and_says_how_many_more(tmp_path):
    write_jsonl(tmp_path / "first.jsonl", [event(n) for n in range(5)])
    run(tmp_path / "first.jsonl")
    path = tmp_path / "second.jsonl"
    write_jsonl(path, [event(n, usage_units="99") for n in range(5)])

    message = import_error(path, max_errors=2)

    assert "5 events reuse an event_id" in message
    assert "line 1, event_id 'evt-000000': differs in usage_units" in message
    assert "line 2, event_id 'evt-000001'" in message
    assert "line 3," not in message
    assert "… and 3 more." in message
    assert UsageEvent.objects.count() == 5


def test_an_invalid_line_deep_in_a_large_file_stores_nothing_and_is_named(tmp_path):
    path = tmp_path / "usage.jsonl"
    # Thousands of rows have been copied into the stage when line 30,000 fails.
    events = [event(n) for n in range(30_001)]
    events[29_999] = event(29_999, usage_date="tomorrow")
    write_jsonl(path, events)

    message = import_error(path)

    assert "1 error, 1 of 30,001 events invalid; nothing was stored." in message
    assert "line 30000, usage_date: 'tomorrow' is not an ISO 8601 date-time." in message
    assert not UsageEvent.objects.exists()


def test_values_are_stored_exactly_as_validated(tmp_path):
    path = tmp_path / "usage.jsonl"
    tricky = 'tab\there, line\nbreak, return\r, back\\slash, \\N, "quoted", é, 漢字, 🙂'
    write_jsonl(path, [
        event(1, comments=tricky, qualifier_1="\\N", qualifier_2="\t"),
        event(2, usage_units="1E+2", amount="-0.5", rate="0.00001",
              usage_date="2026-11-24T11:15:00.123456+01:00", acct_no="42", usage_type=7),
    ])

    run(path)

    first, second = UsageEvent.objects.order_by("event_id")
    assert (first.comments, first.qualifier_1, first.qualifier_2) == (tricky, "\\N", "\t")
    assert (first.acct_no, first.amount, first.rate) == (None, None, None)
    assert (second.usage_units, second.amount, second.rate) == (
        Decimal(100), Decimal("-0.5"), Decimal("0.00001")
    )
    assert second.usage_date.isoformat() == "2026-11-24T10:15:00.123456+00:00"
    assert (second.acct_no, second.usage_type) == (42, 7)


def test_the_metrics_count_created_and_duplicate_events_once_committed(
    tmp_path, django_capture_on_commit_callbacks
):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [event(n) for n in range(3)])
    write_jsonl(tmp_path / "more.jsonl", [event(n) for n in range(5)])
    write_jsonl(tmp_path / "bad.jsonl", [event(9, usage_units="x")])

    def counted() -> tuple[float, float]:
        return tuple(
            REGISTRY.get_sample_value(name) or 0.0
            for name in ("allegro_events_ingested_total", "allegro_events_duplicate_total")
        )

    before = counted()
    with django_capture_on_commit_callbacks(execute=True):
        run(path)
    with django_capture_on_commit_callbacks(execute=True):
        run(tmp_path / "more.jsonl")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        import_error(tmp_path / "bad.jsonl")

    assert callbacks == []  # nothing counted for a refused file
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (5, 3)
