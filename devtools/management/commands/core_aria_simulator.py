from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from devtools.aria_simulator import ConfigError, SimulatorConfig, load_config_file, serve


class Command(BaseCommand):
    help = (
        "Run the core Aria simulator: an HTTP server speaking core Aria's usage API "
        "(bulk_record_usage_m, record_usage_m, get_usage_history_m) with records in memory, "
        "fault knobs, and admin endpoints under /_sim/. Knobs: defaults, then --config, then "
        "flags. SIGTERM or Ctrl-C stops it."
    )
    # It never touches the database: skip the checks so that it starts at once.
    requires_system_checks = []

    def add_arguments(self, parser):
        default_port = urlsplit(settings.ARIA_API_URL).port or 8765
        parser.add_argument(
            "--port", type=int, default=default_port,
            help=f"port to listen on (default {default_port}, from ARIA_API_URL; 0 = any free)",
        )
        parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
        parser.add_argument("--config", help="JSON file of knobs (the POST /_sim/config shape)")
        parser.add_argument("--client-no", type=int, help="default ARIA_CLIENT_NO")
        parser.add_argument("--auth-key", help="default ARIA_AUTH_KEY")
        parser.add_argument(
            "--account", action="append", default=[], metavar="ACCOUNT",
            help="add a known account: CLIENT-ACCT-ID, ACCT_NO or ACCT_NO=CLIENT-ACCT-ID "
            "(repeatable; UNKNOWN-… accounts are never known)",
        )
        parser.add_argument(
            "--usage-type", action="append", default=[], metavar="CODE",
            help="add a known usage type code: CODE or CODE=NUMBER, or * for any (repeatable)",
        )
        parser.add_argument(
            "--latency", metavar="SECONDS",
            help="delay before each API answer: SECONDS or MIN,MAX (uniform)",
        )
        parser.add_argument(
            "--error-rate", type=float, help="share of API calls answered HTTP 500 (0..1)"
        )
        parser.add_argument("--seed", type=int, help="seed of the random 500s and latency")
        parser.add_argument(
            "--late-answer-seconds", type=float,
            help="store the records, then wait this long before answering",
        )
        parser.add_argument(
            "--fail-next-n", type=int, help="answer the next N API calls with HTTP 500"
        )
        parser.add_argument(
            "--partial-error-code", type=int,
            help="top-level error_code when some records fail (default: the first failed "
            "record's code)",
        )

    def handle(self, *args, host, port, config=None, **options):
        base = SimulatorConfig.default()
        base.apply({"client_no": settings.ARIA_CLIENT_NO, "auth_key": settings.ARIA_AUTH_KEY})
        try:
            simulator_config = load_config_file(config, base) if config else base
            simulator_config.apply(_flag_changes(options))
        except ConfigError as error:
            raise CommandError(str(error)) from error
        serve(host=host, port=port, config=simulator_config)


def _flag_changes(options: dict) -> dict:
    """Return the knobs set by command-line flags, in the POST /_sim/config shape."""
    changes = {
        key: options[key]
        for key in ("client_no", "auth_key", "error_rate", "seed", "late_answer_seconds",
                    "fail_next_n", "partial_error_code")
        if options[key] is not None
    }
    if options["account"]:
        changes["accounts"] = [_account(text) for text in options["account"]]
    if options["usage_type"]:
        changes["usage_types"] = [_usage_type(text) for text in options["usage_type"]]
    if options["latency"] is not None:
        try:
            bounds = [float(part) for part in options["latency"].split(",")]
        except ValueError:
            raise CommandError(
                f"--latency: {options['latency']!r} is not SECONDS or MIN,MAX"
            ) from None
        changes["latency_seconds"] = bounds if len(bounds) > 1 else bounds[0]
    return changes


def _account(text: str):
    acct_no, sep, client_acct_id = text.partition("=")
    if sep:
        if not acct_no.isdigit():
            raise CommandError(f"--account: {text!r} is not ACCT_NO=CLIENT-ACCT-ID")
        return {"acct_no": int(acct_no), "client_acct_id": client_acct_id}
    return int(text) if text.isdigit() else text


def _usage_type(text: str):
    code, sep, number = text.partition("=")
    if not sep:
        return code
    if not number.isdigit():
        raise CommandError(f"--usage-type: {text!r} is not CODE=NUMBER")
    return {code: int(number)}
