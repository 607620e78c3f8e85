import shutil
import sys
import tempfile
from contextlib import ExitStack

from django.core.management.base import BaseCommand, CommandError

from allegro.progress import progress as progress_bar
from usage_sync.usage_files import (
    FORMATS,
    UsageFile,
    UsageFileConflict,
    UsageFileInvalid,
    check_usage_file,
    format_from_name,
    import_usage_file,
)


class Command(BaseCommand):
    help = (
        "Import usage events from a CSV or JSON Lines file (plain or gzip). Every line is "
        "validated, as the API validates; if any line is invalid nothing is stored."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="Path of the file, or - to read standard input.")
        parser.add_argument(
            "--format",
            choices=FORMATS,
            help="Default: from the extension (.csv, .jsonl or .ndjson, then optionally .gz).",
        )
        parser.add_argument(
            "--max-errors",
            type=int,
            default=20,
            help="How many errors (or conflicting lines) to print when the file is refused "
            "(default 20).",
        )
        parser.add_argument(
            "--check", action="store_true", help="Only validate the file; store nothing."
        )

    def handle(self, *args, file, format=None, max_errors=20, check=False, **options):
        if max_errors < 0:
            raise CommandError("--max-errors must not be negative.")
        format = format or (None if file == "-" else format_from_name(file))
        if format is None:
            raise CommandError(
                f"Cannot tell the format of {file!r} from its name; pass --format csv or jsonl."
            )
        with ExitStack() as stack:
            usage_file = UsageFile(self._open(file, stack), format=format)
            if check:
                with progress_bar("Checking", total=usage_file.size, unit="B") as progress:
                    result = check_usage_file(usage_file, max_errors=max_errors, progress=progress)
                if not result.is_valid:
                    raise CommandError(self._describe_errors(file, result))
                self.stdout.write(
                    f"Checked {result.lines:,} lines ({result.events:,} events) in "
                    f"{result.seconds:.1f} s: all valid."
                )
                self.stdout.write("Nothing stored (--check).")
                return
            with progress_bar("Importing", total=usage_file.size, unit="B") as progress:
                try:
                    stored = import_usage_file(usage_file, max_errors=max_errors, progress=progress)
                except UsageFileInvalid as exc:
                    raise CommandError(self._describe_errors(file, exc.check)) from exc
                except UsageFileConflict as exc:
                    raise CommandError(self._describe_conflicts(file, exc, max_errors)) from exc
        self.stdout.write(
            f"Read {stored.lines:,} lines: {stored.events:,} events, {stored.created:,} created, "
            f"{stored.duplicates:,} duplicates, 0 errors in {stored.seconds:.1f} s "
            f"({stored.events / max(stored.seconds, 1e-9):,.0f} events/s)."
        )

    def _open(self, file: str, stack: ExitStack):
        if file == "-":
            # Standard input can be read only once, and an import that deadlocked with
            # another reads the file again: spool it to a temporary file (on disk, so memory
            # stays flat).
            spool = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(sys.stdin.buffer, spool, 1024 * 1024)
            return spool
        try:
            return stack.enter_context(open(file, "rb"))
        except FileNotFoundError:
            raise CommandError(f"{file}: no such file.") from None
        except OSError as exc:
            raise CommandError(f"Cannot open {file}: {exc.strerror or exc}.") from exc

    @staticmethod
    def _describe_conflicts(file: str, exc: UsageFileConflict, max_errors: int) -> str:
        lines = [
            f"{file}: {exc.count:,} events reuse an event_id already used for an "
            "event with other content (a correction needs a new event_id); nothing was stored."
        ]
        lines += [
            f"  line {number}, event_id {conflict.event_id!r}: differs in "
            f"{', '.join(conflict.fields)}"
            for number, conflict in exc.conflicts[:max_errors]
        ]
        if exc.count > max_errors:
            lines.append(f"  … and {exc.count - max_errors:,} more.")
        return "\n".join(lines)

    @staticmethod
    def _describe_errors(file: str, result) -> str:
        errors = f"{result.error_count:,} error{'' if result.error_count == 1 else 's'}"
        lines = [
            f"{file}: {errors}, {result.invalid_events:,} of {result.events:,} events invalid; "
            "nothing was stored."
        ]
        lines += [f"  line {e.index}, {e.field}: {e.message}" for e in result.errors]
        if result.error_count > len(result.errors):
            lines.append(f"  … and {result.error_count - len(result.errors):,} more errors.")
        return "\n".join(lines)
