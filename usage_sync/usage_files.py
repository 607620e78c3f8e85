"""Import usage events from CSV and JSON Lines files, streaming, all or nothing.

A file is read twice, line by line and never whole, so memory stays flat whatever its
size: the first pass validates every line with the API's own `ingest.validate_event`
and stores nothing if any line is invalid; the second pass stores the events in chunks,
all in one transaction: a file is imported whole or not at all (an event_id reused with
other content, a crash midway). Importing the same file again stores what is missing and
counts the rest as duplicates.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

from django.db import OperationalError, reset_queries, transaction

from .ingest import (
    KNOWN_FIELDS,
    Conflict,
    EventConflict,
    FieldError,
    ValidEvent,
    store_events,
    validate_event,
)

logger = logging.getLogger(__name__)

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

Progress = Callable[[int], None]


class UsageFileConflict(Exception):
    """Lines reuse an event_id already stored with other content; nothing was stored."""

    def __init__(self, conflicts: list[tuple[int, Conflict]]):
        super().__init__(f"{len(conflicts)} lines reuse an event_id with other content")
        self.conflicts = conflicts  # (line number, conflict), by line


class UsageFileError(Exception):
    """The file cannot be read on from `line` (bad gzip, bad encoding, broken CSV)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One event as read from the file: a parsed mapping, or why it could not be parsed."""

    number: int
    event: object = None
    error: str = ""
    field: str = "line"
    # A problem of the CSV header row, not of an event.
    header: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class FileCheck:
    """Outcome of the validation pass; `errors` holds at most `max_errors` of them."""

    lines: int
    events: int
    invalid_events: int
    error_count: int
    errors: list[FieldError]
    seconds: float

    @property
    def is_valid(self) -> bool:
        return self.error_count == 0


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

    def lines(self, *, progress: Progress | None = None) -> Iterator[Line]:
        """Yield the file's events one at a time, numbered by their first physical line."""
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

    def _json_lines(self, raw_lines: Iterator[tuple[int, bytes | None]]) -> Iterator[Line]:
        for number, raw in raw_lines:
            if raw is None:
                yield Line(number, error=f"Longer than {MAX_LINE_BYTES} bytes.")
                continue
            if not raw.strip():
                continue
            try:
                # Decimal keeps amounts exact; NaN and Infinity still fail validation.
                yield Line(number, event=json.loads(raw, parse_float=Decimal))
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                yield Line(number, error=f"Not valid JSON: {exc}")

    def _csv_lines(self, raw_lines: Iterator[tuple[int, bytes | None]]) -> Iterator[Line]:
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
                    yield Line(1, field=field, error="Unknown column.", header=True)
                elif columns.index(name) != position:
                    yield Line(1, field=name, error="Column appears more than once.", header=True)
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
                    yield Line(
                        start,
                        error=f"Has {len(cells)} cells; the header has {len(columns)} columns.",
                    )
                    continue
                # An empty cell means the field is absent, as if left out of a JSON object.
                fields = {name: cells[position] for position, name in keep if cells[position]}
                yield Line(start, event=fields)
        except csv.Error as exc:
            raise UsageFileError(current, f"Not valid CSV: {exc}") from exc


def check_usage_file(
    usage_file: UsageFile, *, max_errors: int = 20, progress: Progress | None = None
) -> FileCheck:
    """Validate every line of the file without storing anything; keep the first errors."""
    started = time.monotonic()
    events = invalid = error_count = 0
    errors: list[FieldError] = []

    def record(line_errors: list[FieldError]) -> None:
        nonlocal error_count
        error_count += len(line_errors)
        errors.extend(line_errors[: max(0, max_errors - len(errors))])

    try:
        for line in usage_file.lines(progress=progress):
            events += not line.header
            _, line_errors = _validate_line(line)
            if line_errors:
                invalid += not line.header
                record(line_errors)
    except UsageFileError as exc:
        # Nothing after this point can be read; report it like any other error.
        invalid += 1
        record([FieldError(exc.line, "file", exc.message)])
    return FileCheck(
        lines=usage_file.lines_read,
        events=events,
        invalid_events=invalid,
        error_count=error_count,
        errors=errors,
        seconds=time.monotonic() - started,
    )


def import_usage_file(
    usage_file: UsageFile, *, chunk_size: int = 5000, progress: Progress | None = None
) -> ImportResult:
    """Store the events of an already checked file, in one transaction.

    Raises UsageFileError if a line fails validation after all (the file changed since it
    was checked), UsageFileConflict if lines reuse stored event_ids with other content;
    either way nothing of the file is stored.
    """
    attempt = 1
    while True:
        try:
            return _import(usage_file, chunk_size=chunk_size, progress=progress)
        except OperationalError as exc:
            # Each chunk goes in event_id order, but a file spans many chunks: another
            # import or API call storing some of the same ids in another order can
            # deadlock with it. PostgreSQL rolls one back; it can simply run again.
            deadlock = getattr(exc.__cause__, "sqlstate", None) == "40P01"
            if not deadlock or attempt == DEADLOCK_ATTEMPTS:
                raise
            attempt += 1
            logger.warning("the import deadlocked with another ingest of the same event "
                           "ids; importing again (attempt %d)", attempt)


def _import(usage_file: UsageFile, *, chunk_size: int, progress: Progress | None) -> ImportResult:
    started = time.monotonic()
    events = created = duplicates = 0
    chunk: list[ValidEvent] = []
    numbers: list[int] = []
    conflicts: list[tuple[int, Conflict]] = []

    def flush() -> None:
        nonlocal created, duplicates
        try:
            result = store_events(chunk)
        except EventConflict as exc:
            # Read on, to name every conflicting line at once; the whole import is rolled
            # back at the end.
            lines = {event.event_id: number for number, event in zip(numbers, chunk, strict=True)}
            conflicts.extend((lines[c.event_id], c) for c in exc.conflicts)
        else:
            created += result.created
            duplicates += result.duplicates
        chunk.clear()
        numbers.clear()
        # With DEBUG on, Django keeps every SQL statement it ran, and each of ours holds a
        # whole chunk: without this the log would grow with the file (≈1 GB for 1 GB).
        reset_queries()

    with transaction.atomic():
        for line in usage_file.lines(progress=progress):
            events += not line.header
            event, line_errors = _validate_line(line)
            if line_errors:
                first = line_errors[0]
                raise UsageFileError(
                    line.number,
                    f"{first.field}: {first.message} (the file changed after it was checked; "
                    "nothing was stored)",
                )
            chunk.append(event)
            numbers.append(line.number)
            if len(chunk) >= chunk_size:
                flush()
        flush()
        if conflicts:
            raise UsageFileConflict(sorted(conflicts, key=lambda c: c[0]))
    return ImportResult(
        lines=usage_file.lines_read,
        events=events,
        created=created,
        duplicates=duplicates,
        seconds=time.monotonic() - started,
    )


def _validate_line(line: Line) -> tuple[ValidEvent | None, list[FieldError]]:
    if line.error:
        return None, [FieldError(line.number, line.field, line.error)]
    # The API's own validation; the line number takes the place of the list index.
    return validate_event(line.number, line.event)
