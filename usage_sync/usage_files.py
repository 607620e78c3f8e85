"""Import usage events from CSV and JSON Lines files, streaming, all or nothing.

A file is read once, line by line and never whole, so memory stays flat whatever its
size. Each line is validated with the API's own `ingest.validate_row` and, while every line
so far is valid, copied into a staging table with PostgreSQL COPY; then one statement
stores the staged events (`staging.EventStage`). All in one transaction: an invalid line
anywhere (reading on to report every error), an event_id reused with other content or a
crash midway stores nothing of the file. Importing the same file again stores what is
missing and counts the rest as duplicates.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import time
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

from django.db import connection, transaction

from .deadlocks import run_again_on_deadlock
from .events import Conflict
from .ingest import KNOWN_FIELDS, FieldError, count_ingested_on_commit, validate_row
from .staging import EventStage

FORMATS = ("csv", "jsonl")
# How many times an import that deadlocked with a concurrent ingest runs again.
DEADLOCK_ATTEMPTS = 3
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_GZIP_MAGIC = b"\x1f\x8b"
# An event is a few kilobytes at most (comments ≤ 4000 characters); a longer line is an
# error rather than a reason to hold an unbounded line in memory.
MAX_LINE_BYTES = 1024 * 1024
# How often (in lines) the progress callback hears about the bytes read.
_PROGRESS_EVERY = 2000
# Decimal keeps amounts exact; NaN and Infinity still fail validation. One decoder for the
# file: json.loads(…, parse_float=…) would build a new one for every line.
_JSON = json.JSONDecoder(parse_float=Decimal)

Progress = Callable[[int], None]


class UsageFileConflict(Exception):
    """Lines reuse an event_id already stored, or earlier in the file, with other content;
    nothing was stored."""

    def __init__(self, conflicts: list[tuple[int, Conflict]], *, count: int):
        super().__init__(f"{count} lines reuse an event_id with other content")
        self.conflicts = conflicts  # (line number, conflict), by line: the first ones
        self.count = count


class UsageFileError(Exception):
    """The file cannot be read on from `line` (bad gzip, bad encoding, broken CSV)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class BadLine:
    """A line that could not be parsed into an event, and why."""

    error: str
    field: str = "line"
    # A problem of the CSV header row, not of an event.
    header: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class FileCheck:
    """Outcome of validating a file; `errors` holds at most `max_errors` of them."""

    lines: int
    events: int
    invalid_events: int
    error_count: int
    errors: list[FieldError]
    seconds: float

    @property
    def is_valid(self) -> bool:
        return self.error_count == 0


class UsageFileInvalid(Exception):
    """Lines of the file are invalid (`check` says which); nothing was stored."""

    def __init__(self, check: FileCheck):
        super().__init__(f"{check.error_count} errors in {check.invalid_events} events")
        self.check = check


@dataclasses.dataclass(frozen=True, slots=True)
class ImportResult:
    lines: int
    events: int
    created: int
    duplicates: int
    seconds: float


def format_from_name(name: str) -> str | None:
    """Return the format a file name implies (`usage.csv.gz` is csv), or None."""
    path = Path(name)
    if path.suffix.lower() == ".gz":
        path = path.with_suffix("")
    return _EXTENSIONS.get(path.suffix.lower())


class UsageFile:
    """A CSV or JSON Lines file, plain or gzip-compressed, that can be read more than once.

    `source` is a seekable binary file; each `lines()` call starts again from the top.
    """

    def __init__(self, source: BinaryIO, *, format: str):
        if format not in FORMATS:
            raise ValueError(f"Unknown format {format!r}; expected one of {FORMATS}.")
        self.source = source
        self.format = format
        self.lines_read = 0
        source.seek(0)
        self.compressed = source.read(2) == _GZIP_MAGIC
        self.size = source.seek(0, 2)

    def lines(self, *, progress: Progress | None = None) -> Iterator[tuple[int, object]]:
        """Yield the file's events one at a time, numbered by their first physical line:
        (line number, the parsed event, or a BadLine saying why it could not be parsed)."""
        self.lines_read = 0
        raw_lines = self._physical_lines(progress)
        if self.format == "csv":
            return self._csv_lines(raw_lines)
        return self._json_lines(raw_lines)

    def _physical_lines(self, progress: Progress | None) -> Iterator[tuple[int, bytes | None]]:
        # Yields (line number, bytes), or (line number, None) for a line over the limit.
        self.source.seek(0)
        if self.compressed:
            with gzip.GzipFile(fileobj=self.source, mode="rb") as stream:
                yield from self._read_lines(stream, progress)
        else:
            yield from self._read_lines(self.source, progress)

    def _read_lines(
        self, stream: BinaryIO, progress: Progress | None
    ) -> Iterator[tuple[int, bytes | None]]:
        reported = 0
        while True:
            try:
                line = stream.readline(MAX_LINE_BYTES + 1)
                too_long = len(line) > MAX_LINE_BYTES
                while line and len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    line = stream.readline(MAX_LINE_BYTES + 1)
            except (OSError, EOFError, zlib.error) as exc:
                # gzip.BadGzipFile is an OSError; a truncated gzip stream is an EOFError.
                raise UsageFileError(self.lines_read + 1, f"Cannot read the file: {exc}") from exc
            if not line:
                break
            self.lines_read += 1
            yield self.lines_read, None if too_long else line
            if progress is not None and self.lines_read % _PROGRESS_EVERY == 0:
                position = self.source.tell()
                progress(position - reported)
                reported = position
        if progress is not None:
            progress(self.size - reported)

    def _json_lines(
        self, raw_lines: Iterator[tuple[int, bytes | None]]
    ) -> Iterator[tuple[int, object]]:
        scan = _JSON.scan_once
        for number, raw in raw_lines:
            if raw is None:
                yield number, BadLine(f"Longer than {MAX_LINE_BYTES} bytes.")
                continue
            if not raw.strip():
                continue
            # json.loads's own scanner, without its per-call set-up: a UTF-8 line holding
            # one JSON value and JSON whitespace (" \t\n\r") after it.
            try:
                text = raw.decode()
                event, end = scan(text, 0)
                if end != len(text) and text[end:].strip(" \t\n\r"):
                    raise ValueError("extra data")
            except (ValueError, StopIteration):
                # Anything else goes to json.loads, which detects other encodings (a BOM,
                # UTF-16), reads what it accepts exactly as above and words the error.
                try:
                    event = json.loads(raw, parse_float=Decimal)
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                    yield number, BadLine(f"Not valid JSON: {exc}")
                    continue
            yield number, event

    def _csv_lines(
        self, raw_lines: Iterator[tuple[int, bytes | None]]
    ) -> Iterator[tuple[int, object]]:
        current = 0

        def text_lines() -> Iterator[str]:
            nonlocal current
            for number, raw in raw_lines:
                current = number
                if raw is None:
                    raise UsageFileError(number, f"Longer than {MAX_LINE_BYTES} bytes.")
                try:
                    yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UsageFileError(number, f"Not valid UTF-8: {exc}") from exc

        reader = csv.reader(text_lines())
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = [name.strip() for name in header]
            # Unknown and repeated columns are reported once, here, and left out of the
            # rows, so that the rows are still checked for everything else.
            keep = []
            for position, name in enumerate(columns):
                if name not in KNOWN_FIELDS:
                    field = name or f"column {position + 1}"
                    yield 1, BadLine("Unknown column.", field=field, header=True)
                elif columns.index(name) != position:
                    yield 1, BadLine("Column appears more than once.", field=name, header=True)
                else:
                    keep.append((position, name))
            while True:
                start = current + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                if not cells:
                    continue  # a blank line
                if len(cells) != len(columns):
                    yield start, BadLine(
                        f"Has {len(cells)} cells; the header has {len(columns)} columns."
                    )
                    continue
                # An empty cell means the field is absent, as if left out of a JSON object.
                fields = {name: cells[position] for position, name in keep if cells[position]}
                yield start, fields
        except csv.Error as exc:
            raise UsageFileError(current, f"Not valid CSV: {exc}") from exc


class _Validation:
    """Validate a file's lines, counting every error and keeping the first `max_errors`."""

    def __init__(self, usage_file: UsageFile, *, max_errors: int):
        self.usage_file = usage_file
        self.max_errors = max_errors
        self.started = time.monotonic()
        self.events = self.invalid_events = self.error_count = 0
        self.errors: list[FieldError] = []

    def valid_rows(self, progress: Progress | None) -> Iterator[tuple[int, tuple]]:
        """Yield (line number, row in COLUMNS order) for each valid event."""
        try:
            for number, event in self.usage_file.lines(progress=progress):
                if type(event) is BadLine:
                    self.events += not event.header
                    self._fail([FieldError(number, event.field, event.error)], event.header)
                    continue
                self.events += 1
                # The API's own validation; the line number takes the place of the index.
                row, errors = validate_row(number, event)
                if errors:
                    self._fail(errors, False)
                else:
                    yield number, row
        except UsageFileError as exc:
            # Nothing after this point can be read; report it like any other error.
            self._fail([FieldError(exc.line, "file", exc.message)], False)

    def _fail(self, errors: list[FieldError], header: bool) -> None:
        self.invalid_events += not header
        self.error_count += len(errors)
        self.errors.extend(errors[: max(0, self.max_errors - len(self.errors))])

    def result(self) -> FileCheck:
        return FileCheck(
            lines=self.usage_file.lines_read,
            events=self.events,
            invalid_events=self.invalid_events,
            error_count=self.error_count,
            errors=self.errors,
            seconds=time.monotonic() - self.started,
        )


def check_usage_file(
    usage_file: UsageFile, *, max_errors: int = 20, progress: Progress | None = None
) -> FileCheck:
    """Validate every line of the file without storing anything; keep the first errors."""
    validation = _Validation(usage_file, max_errors=max_errors)
    for _ in validation.valid_rows(progress):
        pass
    return validation.result()


def import_usage_file(
    usage_file: UsageFile, *, max_errors: int = 20, progress: Progress | None = None
) -> ImportResult:
    """Validate the file and store its events: one pass, one transaction.

    Raises UsageFileInvalid if any line is invalid, UsageFileConflict if lines reuse an
    event_id with other content (`max_errors` bounds how many of either are kept); either
    way nothing of the file is stored.
    """
    # The stage goes in in event_id order, as the API's events do, but another writer
    # taking the same ids in another order (an older client, a script) can still deadlock
    # with it.
    return run_again_on_deadlock(
        lambda: _import(usage_file, max_errors=max_errors, progress=progress),
        attempts=DEADLOCK_ATTEMPTS, what="the import",
    )


def _import(usage_file: UsageFile, *, max_errors: int, progress: Progress | None) -> ImportResult:
    validation = _Validation(usage_file, max_errors=max_errors)
    with transaction.atomic(), connection.cursor() as cursor:
        stage = EventStage.create(cursor)
        with stage.rows() as add:
            for number, row in validation.valid_rows(progress):
                # After the first error, read on only to report every error.
                if not validation.error_count:
                    add(number, row)
            if validation.error_count:
                # Out of the COPY block: the COPY is aborted and the transaction rolled back.
                raise UsageFileInvalid(validation.result())
        stored = stage.store(max_conflicts=max_errors)
        if stored.conflict_count:
            raise UsageFileConflict(stored.conflicts, count=stored.conflict_count)
        count_ingested_on_commit(stored.created, stored.duplicates)
    return ImportResult(
        lines=usage_file.lines_read,
        events=validation.events,
        created=stored.created,
        duplicates=stored.duplicates,
        seconds=time.monotonic() - validation.started,
    )
