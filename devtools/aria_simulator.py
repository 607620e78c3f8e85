"""A stand-in for core Aria's usage API, run as its own process by tests and `make run`.

It speaks core Aria's wire format (as Aria's A7 API description gives it): HTTP POST at any
path, JSON or form-encoded body, the method chosen by
`rest_call`, errors as HTTP 200 with a non-zero `error_code`. It keeps its usage records in
memory (never in the app's database) and, like real Aria, does not reject duplicate
`client_record_id`s: storing one twice creates two usage records.

Choices where Aria's public material is silent (each code is an opaque value, as for Aria):
- Invalid usage type code → 1017, invalid usage type number → 1018. The real numbers are not
  public; these two are the simulator's own.
- A record's account is its first identifier in the order acct_no, userid, client_acct_id
  (a userid defaults to the client_acct_id). Plan-instance identifiers satisfy "one account
  identifier is required", but the simulator knows no plan instance: a record identified
  only by one fails with Aria's documented 14046 / 14047 / 14053 / 14054.
- When some records of a `bulk_record_usage_m` call fail, the valid ones are stored and the
  answer carries `error_records` (one per failed record; `out_client_record_id` is null when
  the record had none) with a top-level `error_code`/`error_msg` copied from the first failed
  record. The knob `partial_error_code` replaces that code (0 included, to check that a client
  trusts `error_records` rather than the top-level code).
- A missing `usage_date` defaults to the current UTC time; the date must be
  `yyyy-mm-dd hh24:mi:ss` or `yyyy-mm-dd` (an ISO "T" separator is rejected with 1024).
- `get_usage_history_m` needs an account and `date_range_start`, as Aria does (date-only bounds
  mean 00:00:00, both inclusive), unless `client_record_id` is given: that filter is a
  simulator convenience, core Aria has no such filter. Rows carry Aria's own field names
  (`incurring_acct_no`, `specific_record_charge_amount`, …) and the short aliases `acct_no`,
  `client_acct_id` and `amount`; `usage_date` holds date and time. An unknown account is
  error 1009 there too.
- `output_format` is ignored: answers are always JSON.

Fault knobs (start-up config file, command-line flags, or `POST /_sim/config` at runtime):
latency, a seeded share of HTTP 500s, a burst of 500s (`fail_next_n`), and
`late_answer_seconds`: store the records, then wait before answering, so a client's timeout
fires after the records were stored. For the fault suite (tests/faults):
- `flap_fail_calls` / `flap_pass_calls`: API calls cycle through that many HTTP 500s, then
  that many normal answers (core Aria flapping);
- `fail_after_store`: an injected 500 (any of the above) comes after the call was processed,
  its records stored (a gateway failing after Aria did the work);
- `malformed_rate` (seeded) and `malformed_next_n`: the call is processed, then answered
  with HTTP 200 and a body that is not Aria's JSON (truncated, HTML, empty, a JSON array,
  an object without `error_code`, in turn);
- `bogus_error_records`: every `bulk_record_usage_m` answer also carries error records for
  client_record_ids that were not in the call (a list of ids, or a count of made-up ones);
- `anonymous_error_records`: error records come without `out_client_record_id` (null), so
  the client cannot tell which of its records failed;
- `late_store_seconds` (s or [min, max], seeded): a call that stores records waits that long
  *before* storing them, then stores them all the same: a client whose timeout is shorter
  has given up by then (a gateway timing out while core Aria's backend keeps working).
Admin endpoints live under `/_sim/` (see `_Handler`); `POST /_sim/forget` drops stored
records by client_record_id (as if core Aria lost them), for reconciliation tests.
"""

import copy
import json
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, parse_qsl, urlsplit

API_NOT_FOUND = -1
AUTHENTICATION_ERROR = 1004
ACCOUNT_NOT_FOUND = 1009
MISSING_INPUT = 1010
UNABLE_TO_PARSE = 1012
INVALID_INPUT = 1016
INVALID_DATE = 1024
# Not in Aria's public material: the simulator's own numbers.
INVALID_USAGE_TYPE_CODE = 1017
INVALID_USAGE_TYPE = 1018

ADMIN_PREFIX = "/_sim/"
NEVER_KNOWN_PREFIX = "UNKNOWN-"
LONG_RANGE = range(-(2**63), 2**63)

DEFAULT_ACCOUNTS = [
    *({"acct_no": 1000 + n, "client_acct_id": f"ACME-{n:03d}"} for n in range(1, 9)),
    # The other accounts of the demo data (load_demo_data), so `make run` only fails UNKNOWN-.
    *(
        {"acct_no": 2000 + n, "client_acct_id": name}
        for n, name in enumerate(
            ["GLOBEX-001", "INITECH-001", "UMBRELLA-001", "STARK-001", "WAYNE-001", "HOOLI-001"],
            start=1,
        )
    ),
]
DEFAULT_USAGE_TYPES = {
    "API_CALLS": 10001,
    "STORAGE_GB": 10002,
    "SMS": 10003,
    "MINUTES": 10004,
    "SMS_SENT": 10005,
    "DATA_TRANSFER_MB": 10006,
}

# Documented maximum lengths of usage record fields (characters).
_MAX_LENGTHS = {
    "userid": 32,
    "client_acct_id": 50,
    "client_plan_instance_id": 100,
    "client_master_plan_instance_id": 100,
    "usage_type_code": 30,
    "telco_from": 100,
    "telco_to": 1000,
    "exclusion_comments": 300,
    "qualifier_1": 300,
    "qualifier_2": 300,
    "qualifier_3": 300,
    "qualifier_4": 300,
    "client_record_id": 50,
    "caller_id": 50,
}
_LONG_FIELDS = ["acct_no", "usage_type", "plan_instance_no", "master_plan_instance_no",
                "parent_usage_rec_no"]
_NUMBER_FIELDS = ["usage_units", "billable_units", "amt", "rate"]
_ACCOUNT_FIELDS = ["acct_no", "userid", "client_acct_id", "plan_instance_no",
                   "client_plan_instance_id", "master_plan_instance_no",
                   "client_master_plan_instance_id"]
_PLAN_INSTANCE_ERRORS = {
    "plan_instance_no": (14046, "invalid plan instance number"),
    "client_plan_instance_id": (14047, "invalid client plan instance identifier"),
    "master_plan_instance_no": (14053, "invalid master plan instance number"),
    "client_master_plan_instance_id": (14054, "invalid client master plan instance identifier"),
}
# Fields of the call itself, not of the record (record_usage_m sends both flat).
_CALL_FIELDS = {"rest_call", "output_format", "client_no", "auth_key", "client_receipt_id",
                "alt_caller_id", "optional_transaction_qualifiers"}
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}( \d{2}:\d{2}:\d{2})?")
_LONG_RE = re.compile(r"[+-]?\d+")
_BRACKETS_RE = re.compile(r"\[([^\]]*)\]")


class ConfigError(ValueError):
    """A knob value the simulator cannot use."""


class BodyError(ValueError):
    """A request body that is neither JSON nor form-encoded data."""


class _ApiError(Exception):
    """An Aria error answer: HTTP 200 with a non-zero error_code."""

    def __init__(self, code: int, message: str, *, acct_no: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.acct_no = acct_no


@dataclass
class Account:
    acct_no: int
    client_acct_id: str | None = None
    userid: str | None = None


@dataclass
class SimulatorConfig:
    """Every knob of the simulator; `apply` merges a JSON-shaped dict of changes."""

    client_no: int = 1000
    auth_key: str = "simulator-auth-key"
    accounts: dict[int, Account] = field(default_factory=dict)
    usage_types: dict[str, int | None] = field(default_factory=dict)
    any_usage_type: bool = False
    latency_seconds: tuple[float, float] = (0.0, 0.0)
    error_rate: float = 0.0
    seed: int | None = None
    late_answer_seconds: float = 0.0
    fail_next_n: int = 0
    partial_error_code: int | None = None
    flap_fail_calls: int = 0
    flap_pass_calls: int = 0
    fail_after_store: bool = False
    malformed_rate: float = 0.0
    malformed_next_n: int = 0
    bogus_error_records: list[str] | int = 0
    anonymous_error_records: bool = False
    late_store_seconds: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def default(cls) -> "SimulatorConfig":
        config = cls()
        config.apply({"accounts": DEFAULT_ACCOUNTS, "usage_types": DEFAULT_USAGE_TYPES})
        return config

    def apply(self, changes: dict) -> list[str]:
        """Merge `changes` (the config file / POST /_sim/config shape); return the keys changed.

        Keys: client_no, auth_key, accounts (added: "CLIENT-ID", 1009 or {"acct_no",
        "client_acct_id", "userid"}), remove_accounts, reset_accounts (clear first),
        usage_types (added: "CODE", {"CODE": number}, or "*" for any), reset_usage_types,
        latency_seconds (s, [min, max] or {"min", "max"}), error_rate (0..1), seed,
        late_answer_seconds, fail_next_n, partial_error_code (int, or null for the first
        failed record's code), flap_fail_calls, flap_pass_calls, fail_after_store (bool),
        malformed_rate (0..1), malformed_next_n, bogus_error_records (list of ids, or count),
        anonymous_error_records (bool), late_store_seconds (like latency_seconds).
        Nothing changes when a value is invalid.
        """
        if not isinstance(changes, dict):
            raise ConfigError("the configuration must be a JSON object")
        unknown = set(changes) - _CONFIG_KEYS
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        new = copy.deepcopy(self)
        if "client_no" in changes:
            new.client_no = _config_long(changes["client_no"], "client_no")
        if "auth_key" in changes:
            key = changes["auth_key"]
            if not isinstance(key, str) or not key or len(key) > 32:
                raise ConfigError("auth_key must be a string of 1 to 32 characters")
            new.auth_key = key
        if changes.get("reset_accounts"):
            new.accounts = {}
        for item in _as_list(changes.get("remove_accounts")):
            new._remove_account(item)
        for item in _as_list(changes.get("accounts")):
            new._add_account(item)
        if changes.get("reset_usage_types"):
            new.usage_types, new.any_usage_type = {}, False
        if "usage_types" in changes:
            new._add_usage_types(changes["usage_types"])
        for name in ("latency_seconds", "late_store_seconds"):
            if name in changes:
                setattr(new, name, _config_latency(changes[name], name))
        for name in ("error_rate", "malformed_rate"):
            if name in changes:
                rate = _config_seconds(changes[name], name)
                if rate > 1:
                    raise ConfigError(f"{name} must be between 0 and 1")
                setattr(new, name, rate)
        if "seed" in changes:
            seed = changes["seed"]
            new.seed = None if seed is None else _config_long(seed, "seed")
        if "late_answer_seconds" in changes:
            new.late_answer_seconds = _config_seconds(
                changes["late_answer_seconds"], "late_answer_seconds"
            )
        if "partial_error_code" in changes:
            code = changes["partial_error_code"]
            new.partial_error_code = (
                None if code is None else _config_long(code, "partial_error_code")
            )
        for name in ("fail_next_n", "flap_fail_calls", "flap_pass_calls", "malformed_next_n"):
            if name in changes:
                count = _config_long(changes[name], name)
                if count < 0:
                    raise ConfigError(f"{name} must not be negative")
                setattr(new, name, count)
        for name in ("fail_after_store", "anonymous_error_records"):
            if name in changes:
                if not isinstance(changes[name], bool):
                    raise ConfigError(f"{name} must be true or false")
                setattr(new, name, changes[name])
        if "bogus_error_records" in changes:
            new.bogus_error_records = _config_bogus(changes["bogus_error_records"])
        self.__dict__.update(new.__dict__)
        return sorted(changes)

    def public(self) -> dict:
        """Return the knobs as JSON, without the auth_key."""
        return {
            "client_no": self.client_no,
            "auth_key_set": bool(self.auth_key),
            "accounts": [
                {"acct_no": a.acct_no, "client_acct_id": a.client_acct_id, "userid": a.userid}
                for a in sorted(self.accounts.values(), key=lambda a: a.acct_no)
            ],
            "usage_types": "*" if self.any_usage_type else dict(sorted(self.usage_types.items())),
            "latency_seconds": list(self.latency_seconds),
            "error_rate": self.error_rate,
            "seed": self.seed,
            "late_answer_seconds": self.late_answer_seconds,
            "fail_next_n": self.fail_next_n,
            "partial_error_code": self.partial_error_code,
            "flap_fail_calls": self.flap_fail_calls,
            "flap_pass_calls": self.flap_pass_calls,
            "fail_after_store": self.fail_after_store,
            "malformed_rate": self.malformed_rate,
            "malformed_next_n": self.malformed_next_n,
            "bogus_error_records": self.bogus_error_records,
            "anonymous_error_records": self.anonymous_error_records,
            "late_store_seconds": list(self.late_store_seconds),
        }

    def find_account(self, field_name: str, value) -> Account | None:
        if isinstance(value, str) and value.startswith(NEVER_KNOWN_PREFIX):
            return None
        if field_name == "acct_no":
            return self.accounts.get(value)
        return next(
            (a for a in self.accounts.values() if getattr(a, field_name) == value), None
        )

    def _add_account(self, item) -> None:
        if isinstance(item, bool):
            raise ConfigError(f"not an account: {item!r}")
        if isinstance(item, int | str):
            item = {"acct_no": item} if isinstance(item, int) else {"client_acct_id": item}
        if not isinstance(item, dict) or not set(item) <= {"acct_no", "client_acct_id", "userid"}:
            raise ConfigError(f"not an account: {item!r}")
        client_acct_id = item.get("client_acct_id")
        userid = item.get("userid", client_acct_id)
        for name, value, limit in (("client_acct_id", client_acct_id, 50), ("userid", userid, 32)):
            if value is None:
                continue
            if not isinstance(value, str) or not value or len(value) > limit:
                raise ConfigError(f"{name} must be a string of 1 to {limit} characters")
            if value.startswith(NEVER_KNOWN_PREFIX):
                raise ConfigError(f"{value}: {NEVER_KNOWN_PREFIX}… accounts are never known")
        if client_acct_id is not None and self.find_account("client_acct_id", client_acct_id):
            if "acct_no" not in item:
                return  # already known
            self._remove_account(client_acct_id)
        if "acct_no" in item:
            acct_no = _config_long(item["acct_no"], "acct_no")
        else:
            acct_no = max(self.accounts, default=3000) + 1
        self.accounts[acct_no] = Account(acct_no, client_acct_id, userid)

    def _remove_account(self, item) -> None:
        if isinstance(item, dict):
            item = item.get("acct_no", item.get("client_acct_id"))
        if isinstance(item, str):
            account = self.find_account("client_acct_id", item)
            item = account.acct_no if account else None
        self.accounts.pop(item, None)

    def _add_usage_types(self, value) -> None:
        if value == "*" or (isinstance(value, list) and "*" in value):
            self.any_usage_type = True
            return
        if isinstance(value, dict):
            value = [{code: number} for code, number in value.items()]
        for item in _as_list(value):
            if isinstance(item, str):
                item = {item: None}
            if not isinstance(item, dict):
                raise ConfigError(f"not a usage type: {item!r}")
            for code, number in item.items():
                if not code or len(code) > 30:
                    raise ConfigError("a usage type code has 1 to 30 characters")
                if number is None:
                    number = max(filter(None, self.usage_types.values()), default=10000) + 1
                self.usage_types[code] = _config_long(number, f"usage type {code}")


_CONFIG_KEYS = {
    "client_no", "auth_key", "accounts", "remove_accounts", "reset_accounts", "usage_types",
    "reset_usage_types", "latency_seconds", "error_rate", "seed", "late_answer_seconds",
    "fail_next_n", "partial_error_code", "flap_fail_calls", "flap_pass_calls",
    "fail_after_store", "malformed_rate", "malformed_next_n", "bogus_error_records",
    "anonymous_error_records", "late_store_seconds",
}


class AriaSimulator:
    """The simulated core Aria: knobs, stored usage records and the call log, behind one lock."""

    def __init__(self, config: SimulatorConfig, *, log: Callable[[str], None] | None = None):
        self._startup_config = copy.deepcopy(config)
        self._lock = threading.Lock()
        self._log = log or _log_to_stderr
        # Set on shutdown, so that requests sleeping for latency or a late answer wake up.
        self.stopping = threading.Event()
        with self._lock:
            self._reset(config)

    def _reset(self, config: SimulatorConfig) -> None:
        self.config = copy.deepcopy(config)
        self._records: list[dict] = []
        self._calls: list[dict] = []
        self._calls_by_rest_call: Counter[str] = Counter()
        self._next_usage_rec_no = 900_000_001
        self._flap_position = 0
        self._seed_random()

    def _seed_random(self) -> None:
        # Two generators: the sequence of injected 500s does not depend on latency draws.
        self._failure_random = random.Random(self.config.seed)
        self._latency_random = random.Random(self.config.seed)
        self._malformed_random = random.Random(self.config.seed)
        self._late_store_random = random.Random(self.config.seed)

    # --- API calls -------------------------------------------------------------------------

    def handle_call(self, *, path: str, content_type: str, body: bytes) -> dict:
        """Answer one API call; return the call-log entry with `http_status` and `response`.

        The records are stored before this returns; the caller waits `late_answer_seconds`
        (in the entry) before sending the response.
        """
        started = time.monotonic()
        try:
            params = parse_body(body, content_type)
        except BodyError:
            params = None
        rest_call = params.get("rest_call") if params else None
        entry = {
            "path": path,
            "rest_call": rest_call if isinstance(rest_call, str) else None,
            "client_receipt_id": params.get("client_receipt_id") if params else None,
            **_describe_usage(params, rest_call),
        }
        with self._lock:
            entry["id"] = len(self._calls) + 1
            entry["received_at"] = _now_text()
            self._calls.append(entry)
            self._calls_by_rest_call[entry["rest_call"] or "(none)"] += 1
            injected = self._injected_failure()
            malformed = None if injected else self._malformed_body_kind(entry["id"])
            latency = self._latency_random.uniform(*self.config.latency_seconds)
            stores = entry["rest_call"] in ("bulk_record_usage_m", "record_usage_m")
            late_store = (
                self._late_store_random.uniform(*self.config.late_store_seconds) if stores else 0
            )
        if latency:
            self.stopping.wait(latency)
        if late_store:
            # The caller may have given up by now; the records are stored all the same.
            entry["late_store_seconds"] = round(late_store, 3)
            self.stopping.wait(late_store)
        # The entry is in the call log: change it only under the lock.
        with self._lock:
            if injected and self.config.fail_after_store:
                # The work is done (records stored), then the answer is lost to a 500.
                _, stored = self._answer(params)
                entry.update(
                    http_status=500, injected=injected, response=None, late_answer_seconds=0,
                    stored=stored,
                )
            elif injected:
                entry.update(
                    http_status=500, injected=injected, response=None, late_answer_seconds=0
                )
            else:
                response, stored = self._answer(params)
                if rest_call == "bulk_record_usage_m" and self.config.bogus_error_records:
                    response = self._with_bogus_error_records(response, entry)
                stores = rest_call in ("bulk_record_usage_m", "record_usage_m")
                entry.update(
                    http_status=200,
                    injected=None,
                    response=response,
                    error_code=response["error_code"],
                    error_msg=response["error_msg"],
                    stored=stored,
                    error_records=len(response.get("error_records", [])),
                    late_answer_seconds=self.config.late_answer_seconds if stores else 0,
                    malformed=malformed,
                )
            entry["processing_ms"] = round((time.monotonic() - started) * 1000)
        return entry

    def _injected_failure(self) -> str | None:
        if self.config.fail_next_n > 0:
            self.config.fail_next_n -= 1
            return "fail_next_n"
        if self.config.flap_fail_calls:
            cycle = self.config.flap_fail_calls + self.config.flap_pass_calls
            position = self._flap_position % cycle
            self._flap_position += 1
            if position < self.config.flap_fail_calls:
                return "flap"
        if self.config.error_rate and self._failure_random.random() < self.config.error_rate:
            return "error_rate"
        return None

    def _malformed_body_kind(self, call_id: int) -> str | None:
        """Return which malformed body this call gets (MALFORMED_BODIES), or None."""
        if self.config.malformed_next_n > 0:
            self.config.malformed_next_n -= 1
        elif not (
            self.config.malformed_rate
            and self._malformed_random.random() < self.config.malformed_rate
        ):
            return None
        kinds = sorted(MALFORMED_BODIES)
        return kinds[call_id % len(kinds)]

    def _with_bogus_error_records(self, response: dict, entry: dict) -> dict:
        """Add error records for client_record_ids that were not in the call."""
        bogus = self.config.bogus_error_records
        ids = bogus if isinstance(bogus, list) else [
            f"BOGUS-{entry['id']}-{n}" for n in range(1, bogus + 1)
        ]
        ids = [cid for cid in ids if cid not in entry["client_record_ids"]]
        if not ids:
            return response
        extra = [
            {"out_client_record_id": cid, "acct_no": None, "record_error_code": 1001,
             "record_error_msg": "unexpected error"}
            for cid in ids
        ]
        error_records = [*response.get("error_records", []), *extra]
        code = self.config.partial_error_code
        first = error_records[0]
        if code is None:
            top = _error(first["record_error_code"], first["record_error_msg"])
        else:
            top = _error(code, first["record_error_msg"] if code else "OK")
        return {**top, "error_records": error_records}

    def _answer(self, params: dict | None) -> tuple[dict, int]:
        """Return Aria's answer to `params` and how many records were stored."""
        if params is None:
            return _error(UNABLE_TO_PARSE, "unable to parse input"), 0
        method = _METHODS.get(params.get("rest_call"))
        if method is None:
            return _error(API_NOT_FOUND, "API not found"), 0
        try:
            self._authenticate(params)
            return method(self, params)
        except _ApiError as error:
            return _error(error.code, error.message), 0

    def _authenticate(self, params: dict) -> None:
        for name in ("client_no", "auth_key"):
            if _is_missing(params.get(name)):
                raise _ApiError(MISSING_INPUT, f"Missing input: {name} is required")
        try:
            client_no = _as_long(params["client_no"])
        except ValueError:
            client_no = None
        if client_no != self.config.client_no or params["auth_key"] != self.config.auth_key:
            raise _ApiError(AUTHENTICATION_ERROR, "authentication error")

    def _bulk_record_usage(self, params: dict) -> tuple[dict, int]:
        receipt_id = _receipt_id(params)
        usage_recs = params.get("usage_recs")
        if isinstance(usage_recs, str):
            try:
                usage_recs = json.loads(usage_recs, parse_float=Decimal)
            except ValueError:
                raise _ApiError(UNABLE_TO_PARSE, "unable to parse input") from None
        if _is_missing(usage_recs) or usage_recs == []:
            raise _ApiError(MISSING_INPUT, "Missing input: usage_recs is required")
        if not isinstance(usage_recs, list):
            raise _ApiError(UNABLE_TO_PARSE, "unable to parse input")
        error_records = []
        stored = 0
        for rec in usage_recs:
            try:
                record = self._validated(rec)
            except _ApiError as error:
                client_record_id = rec.get("client_record_id") if isinstance(rec, dict) else None
                error_records.append({
                    "out_client_record_id": None
                    if client_record_id is None or self.config.anonymous_error_records
                    else str(client_record_id),
                    "acct_no": error.acct_no,
                    "record_error_code": error.code,
                    "record_error_msg": error.message,
                })
                continue
            self._store(record, rest_call="bulk_record_usage_m", receipt_id=receipt_id, raw=rec)
            stored += 1
        if not error_records:
            return _error(0, "OK"), stored
        first = error_records[0]
        code = self.config.partial_error_code
        if code is None:
            response = _error(first["record_error_code"], first["record_error_msg"])
        else:
            response = _error(code, first["record_error_msg"] if code else "OK")
        response["error_records"] = error_records
        return response, stored

    def _record_usage(self, params: dict) -> tuple[dict, int]:
        receipt_id = _receipt_id(params)
        rec = {k: v for k, v in params.items() if k not in _CALL_FIELDS}
        record = self._store(
            self._validated(rec), rest_call="record_usage_m", receipt_id=receipt_id, raw=rec
        )
        return {**_error(0, "OK"), "usage_rec_no": record["usage_rec_no"]}, 1

    def _usage_history(self, params: dict) -> tuple[dict, int]:
        client_record_id = params.get("client_record_id")
        client_record_id = None if _is_missing(client_record_id) else str(client_record_id)
        account = None
        if not _is_missing(params.get("acct_no")):
            account = self._account(params, "acct_no", "AriaNo")
        elif not _is_missing(params.get("client_acct_id")):
            account = self._account(params, "client_acct_id", "ClientId")
        elif client_record_id is None:
            raise _ApiError(MISSING_INPUT, "Missing input: acct_no is required")
        start = _optional_date(params, "date_range_start")
        end = _optional_date(params, "date_range_end")
        if start is None and client_record_id is None:
            raise _ApiError(MISSING_INPUT, "Missing input: date_range_start is required")
        usage_type_code = params.get("specified_usage_type_code", params.get("usage_type_code"))
        usage_type_no = _optional_long(params, "specified_usage_type_no")
        limit = _optional_long(params, "limit")
        offset = _optional_long(params, "offset") or 0
        rows = [
            r for r in self._records
            if (account is None or r["acct_no"] == account.acct_no)
            and (client_record_id is None or r["client_record_id"] == client_record_id)
            and (start is None or r["usage_datetime"] >= start)
            and (end is None or r["usage_datetime"] <= end)
            and (_is_missing(usage_type_code) or r["usage_type_code"] == usage_type_code)
            and (usage_type_no is None or r["usage_type_no"] == usage_type_no)
        ]
        rows = rows[offset:] if limit is None else rows[offset:offset + max(limit, 0)]
        return {**_error(0, "OK"), "usage_history_recs": [_history_row(r) for r in rows]}, 0

    def _account(self, params: dict, field_name: str, label: str) -> Account:
        value = params[field_name]
        value = _checked_long(value, "acct_no") if field_name == "acct_no" else str(value)
        account = self.config.find_account(field_name, value)
        if account is None:
            raise _ApiError(ACCOUNT_NOT_FOUND, f"Account not found: {label} {value}")
        return account

    def _validated(self, rec) -> dict:
        """Check one usage record against Aria's rules; return it normalised or raise _ApiError."""
        if not isinstance(rec, dict):
            raise _ApiError(UNABLE_TO_PARSE, "unable to parse input")
        rec = {k: v for k, v in rec.items() if not _is_missing(v)}
        given_accounts = [name for name in _ACCOUNT_FIELDS if name in rec]
        if not given_accounts:
            raise _ApiError(MISSING_INPUT, "Missing input: acct_no is required")
        acct_no = _checked_long(rec["acct_no"], "acct_no") if "acct_no" in rec else None
        longs = {}
        for name in _LONG_FIELDS:
            if name in rec:
                try:
                    longs[name] = _checked_long(rec[name], name)
                except _ApiError as error:
                    error.acct_no = acct_no
                    raise
        if "usage_type" not in rec and "usage_type_code" not in rec:
            raise _ApiError(MISSING_INPUT, "Missing input: usage_type is required", acct_no=acct_no)
        if "usage_units" not in rec:
            raise _ApiError(MISSING_INPUT, "Missing input: usage_units is required",
                            acct_no=acct_no)
        numbers = {}
        for name in _NUMBER_FIELDS:
            if name in rec:
                try:
                    numbers[name] = _as_number(rec[name])
                except ValueError:
                    raise _ApiError(
                        INVALID_INPUT, f"{name}: {rec[name]} is not a valid number", acct_no=acct_no
                    ) from None
        usage_date = rec.get("usage_date")
        if usage_date is None:
            usage_datetime = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        else:
            usage_datetime = _parse_date(usage_date)
            if usage_datetime is None:
                raise _ApiError(
                    INVALID_DATE, f"invalid date format: usage_date {usage_date}", acct_no=acct_no
                )
        texts = {name: str(rec[name]) for name in _MAX_LENGTHS if name in rec}
        for name, text in texts.items():
            if len(text) > _MAX_LENGTHS[name]:
                raise _ApiError(
                    INVALID_INPUT,
                    f"{name}: longer than {_MAX_LENGTHS[name]} characters",
                    acct_no=acct_no,
                )
        account = self._record_account(given_accounts, {**rec, **longs, **texts}, acct_no)
        usage_type_no, usage_type_code = self._usage_type(longs.get("usage_type"),
                                                          texts.get("usage_type_code"),
                                                          account.acct_no)
        amount = numbers.get("amt")
        if amount is None and "rate" in numbers:
            amount = (numbers["usage_units"] * numbers["rate"]).quantize(Decimal("0.01"))
        return {
            "client_record_id": texts.get("client_record_id"),
            "acct_no": account.acct_no,
            "client_acct_id": account.client_acct_id,
            "userid": account.userid,
            "usage_type_no": usage_type_no,
            "usage_type_code": usage_type_code,
            "usage_datetime": usage_datetime,
            "usage_date": usage_datetime.strftime("%Y-%m-%d %H:%M:%S"),
            "units": numbers["usage_units"],
            "billable_units": numbers.get("billable_units"),
            "amt": numbers.get("amt"),
            "rate": numbers.get("rate"),
            "amount": amount,
            **{f"qualifier_{n}": texts.get(f"qualifier_{n}") for n in range(1, 5)},
            "comments": rec.get("comments"),
            "telco_from": texts.get("telco_from"),
            "telco_to": texts.get("telco_to"),
            "exclude_from_billing": str(rec.get("exclude_from_billing", "false")).lower(),
            "exclusion_comments": texts.get("exclusion_comments"),
            "parent_usage_rec_no": longs.get("parent_usage_rec_no"),
            "caller_id": texts.get("caller_id"),
        }

    def _record_account(self, given: list[str], rec: dict, acct_no: int | None) -> Account:
        name = given[0]  # Aria's order of precedence: acct_no, userid, client_acct_id, plans.
        if name in _PLAN_INSTANCE_ERRORS:
            code, message = _PLAN_INSTANCE_ERRORS[name]
            raise _ApiError(code, message)
        account = self.config.find_account(name, rec[name])
        if account is None:
            label = {"acct_no": "AriaNo", "userid": "Userid", "client_acct_id": "ClientId"}[name]
            raise _ApiError(ACCOUNT_NOT_FOUND, f"Account not found: {label} {rec[name]}",
                            acct_no=acct_no)
        return account

    def _usage_type(self, number: int | None, code: str | None, acct_no: int):
        types = self.config.usage_types
        if number is not None and not self.config.any_usage_type and number not in types.values():
            raise _ApiError(INVALID_USAGE_TYPE, "invalid usage type", acct_no=acct_no)
        if code is not None and not self.config.any_usage_type and code not in types:
            raise _ApiError(INVALID_USAGE_TYPE_CODE, "invalid usage type code", acct_no=acct_no)
        if code is None:
            code = next((c for c, n in types.items() if n == number), None)
        elif number is None:
            number = types.get(code)
        return number, code

    def _store(self, record: dict, *, rest_call: str, receipt_id: str | None, raw: dict) -> dict:
        record = {
            "usage_rec_no": self._next_usage_rec_no,
            **record,
            "client_receipt_id": receipt_id,
            "rest_call": rest_call,
            "recorded_at": _now_text(),
            "input": raw,
        }
        self._next_usage_rec_no += 1
        self._records.append(record)
        return record

    # --- admin -----------------------------------------------------------------------------

    def forget(self, client_record_ids: list[str]) -> int:
        """Drop the stored records with these client_record_ids; return how many."""
        wanted = set(client_record_ids)
        with self._lock:
            kept = [r for r in self._records if r["client_record_id"] not in wanted]
            forgotten = len(self._records) - len(kept)
            self._records = kept
        return forgotten

    def mark_delivered(self, entry: dict, delivered: bool) -> None:
        with self._lock:
            entry["delivered"] = delivered

    def state(self) -> dict:
        with self._lock:
            return {
                "calls": len(self._calls),
                "calls_by_rest_call": dict(self._calls_by_rest_call),
                "http_500s": sum(c.get("http_status") == 500 for c in self._calls),
                "records_stored": len(self._records),
                "config": self.config.public(),
            }

    def records(self, filters: dict[str, str]) -> list[dict]:
        with self._lock:
            records = list(self._records)
        for name, value in filters.items():
            records = [r for r in records if str(r.get(name)) == value]
        return [{k: v for k, v in r.items() if k != "usage_datetime"} for r in records]

    def calls(self) -> list[dict]:
        with self._lock:
            return [{k: v for k, v in c.items() if k != "response"} for c in self._calls]

    def configure(self, changes: dict) -> list[str]:
        with self._lock:
            changed = self.config.apply(changes)
            if "seed" in changes:
                self._seed_random()
            return changed

    def reset(self) -> None:
        """Forget every record and call, and go back to the start-up configuration."""
        with self._lock:
            self._reset(self._startup_config)

    def log(self, line: str) -> None:
        self._log(line)


_METHODS = {
    "bulk_record_usage_m": AriaSimulator._bulk_record_usage,
    "record_usage_m": AriaSimulator._record_usage,
    "get_usage_history_m": AriaSimulator._usage_history,
}


class SimulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: AriaSimulator):
        super().__init__(address, _Handler)
        self.simulator = simulator


class _Handler(BaseHTTPRequestHandler):
    """API calls: POST at any path. Admin (JSON) under /_sim/: GET health, state, records
    (?field=value filters, e.g. client_record_id), calls; POST config (merge knobs), reset."""

    server: SimulatorServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, a client calling back to
    # back waits for a delayed ACK (~45 ms) on every answer.
    disable_nagle_algorithm = True
    server_version = "AriaSimulator/1"

    def do_POST(self):
        body = self._read_body()
        path = urlsplit(self.path).path
        if path.startswith(ADMIN_PREFIX):
            self._admin_post(path, body)
        else:
            # A body whose framing cannot be read is answered like any unparseable input.
            self._api_call(path, body or b"")

    def do_GET(self):
        url = urlsplit(self.path)
        simulator = self.server.simulator
        if url.path == ADMIN_PREFIX + "health":
            self._send_json(200, {"status": "ok"})
        elif url.path == ADMIN_PREFIX + "state":
            self._send_json(200, simulator.state())
        elif url.path == ADMIN_PREFIX + "records":
            filters = {k: v[-1] for k, v in parse_qs(url.query).items()}
            records = simulator.records(filters)
            self._send_json(200, {"count": len(records), "records": records})
        elif url.path == ADMIN_PREFIX + "calls":
            self._send_json(200, {"calls": simulator.calls()})
        elif url.path.startswith(ADMIN_PREFIX):
            self._send_json(404, {"error": f"no admin endpoint {url.path}"})
        else:
            self._method_not_allowed()

    def do_PUT(self):
        self._read_body()
        self._method_not_allowed()

    do_DELETE = do_PATCH = do_PUT

    def _api_call(self, path: str, body: bytes) -> None:
        simulator = self.server.simulator
        entry = simulator.handle_call(
            path=path, content_type=self.headers.get("Content-Type", ""), body=body
        )
        if entry["late_answer_seconds"]:
            simulator.stopping.wait(entry["late_answer_seconds"])
        try:
            if entry["http_status"] == 500:
                self._send(500, b"Internal Server Error (simulated)", "text/plain")
            elif entry.get("malformed"):
                body, content_type = MALFORMED_BODIES[entry["malformed"]](entry["response"])
                self._send(200, body, content_type)
            else:
                self._send_json(200, entry["response"])
            delivered = True
        except OSError:
            # The client gave up (its timeout) before the answer: the records stay stored.
            self.close_connection = True
            delivered = False
        simulator.mark_delivered(entry, delivered)
        simulator.log(_call_line(entry, delivered))

    def _admin_post(self, path: str, body: bytes | None) -> None:
        simulator = self.server.simulator
        if path == ADMIN_PREFIX + "reset":
            simulator.reset()
            simulator.log("admin reset: records and calls cleared, start-up configuration back")
            self._send_json(200, {"status": "ok"})
        elif path == ADMIN_PREFIX + "config":
            try:
                changes = json.loads(body or b"{}")
                changed = simulator.configure(changes)
            except (ValueError, ConfigError) as error:
                self._send_json(400, {"error": str(error)})
                return
            simulator.log(f"admin config changed: {', '.join(changed) or 'nothing'}")
            self._send_json(200, simulator.state()["config"])
        elif path == ADMIN_PREFIX + "forget":
            try:
                ids = json.loads(body or b"{}").get("client_record_ids")
                if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                    raise ValueError("client_record_ids must be a list of strings")
            except (ValueError, AttributeError) as error:
                self._send_json(400, {"error": str(error)})
                return
            forgotten = simulator.forget(ids)
            simulator.log(f"admin forget: {forgotten} stored records dropped")
            self._send_json(200, {"forgotten": forgotten})
        elif path in (ADMIN_PREFIX + "health", ADMIN_PREFIX + "state", ADMIN_PREFIX + "records",
                      ADMIN_PREFIX + "calls"):
            self._method_not_allowed(allow="GET")
        else:
            self._send_json(404, {"error": f"no admin endpoint {path}"})

    def _read_body(self) -> bytes | None:
        """Return the request body, or None when its framing cannot be read."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _method_not_allowed(self, allow: str = "POST") -> None:
        self._send_json(405, {"error": "method not allowed"}, headers={"Allow": allow})

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload, default=_json_default).encode()
        self._send(status, body, "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_request(self, code="-", size="-"):
        """Stay quiet: API calls get one line of their own (never the auth_key)."""


def make_server(*, host: str, port: int, config: SimulatorConfig,
                log: Callable[[str], None] | None = None) -> SimulatorServer:
    """Bind the simulator to host:port (port 0 picks a free one); serve it with serve_forever."""
    return SimulatorServer((host, port), AriaSimulator(config, log=log))


def serve(*, host: str, port: int, config: SimulatorConfig) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    server = make_server(host=host, port=port, config=config)
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    _log_to_stderr(
        f"listening on http://{host}:{server.server_port} "
        f"(client_no {config.client_no}, {len(config.accounts)} accounts, usage types "
        f"{'*' if config.any_usage_type else ', '.join(sorted(config.usage_types))})"
    )
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.simulator.stopping.set()
        server.shutdown()
        thread.join()
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _log_to_stderr("stopped")


# --- parsing -------------------------------------------------------------------------------


def parse_body(body: bytes, content_type: str) -> dict:
    """Decode a JSON or form-encoded body into a dict; raise BodyError when neither."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("not UTF-8") from None
    media_type = content_type.split(";")[0].strip().lower()
    is_json = media_type == "application/json" or media_type.endswith("+json")
    if not is_json and media_type != "application/x-www-form-urlencoded":
        is_json = text.lstrip().startswith("{")
    if not text.strip():
        raise BodyError("empty body")
    if is_json:
        try:
            params = json.loads(text, parse_float=Decimal)
        except ValueError:
            raise BodyError("not JSON") from None
        if not isinstance(params, dict):
            raise BodyError("not a JSON object")
        return params
    return parse_form(text)


def parse_form(text: str) -> dict:
    """Decode form data, nesting `usage_recs[0][acct_no]=…` keys into lists and dicts."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BodyError("not form data") from None
    result: dict = {}
    for key, value in pairs:
        base, bracket, rest = key.partition("[")
        parts = [base, *_BRACKETS_RE.findall(bracket + rest)] if bracket else [key]
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part or str(len(node)), {})
            if not isinstance(node, dict):
                raise BodyError(f"conflicting form keys at {key}")
        last = parts[-1] or str(len(node))
        if isinstance(node.get(last), dict):
            raise BodyError(f"conflicting form keys at {key}")
        node[last] = value
    return _listify(result)


def _listify(value):
    if not isinstance(value, dict):
        return value
    items = {k: _listify(v) for k, v in value.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _describe_usage(params: dict | None, rest_call) -> dict:
    """Return what the call log keeps of the records sent (never the auth_key)."""
    if not params:
        return {"usage_rec_count": 0, "client_record_ids": []}
    if rest_call == "record_usage_m":
        recs = [params]
    else:
        recs = params.get("usage_recs")
        if isinstance(recs, str):
            try:
                recs = json.loads(recs)
            except ValueError:
                recs = None
        recs = recs if isinstance(recs, list) else []
    ids = [r.get("client_record_id") for r in recs if isinstance(r, dict)]
    return {"usage_rec_count": len(recs), "client_record_ids": [i for i in ids if i is not None]}


def _is_missing(value) -> bool:
    return value is None or value == ""


def _as_long(value) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _LONG_RE.fullmatch(value.strip()):
        number = int(value)
    else:
        raise ValueError(value)
    if number not in LONG_RANGE:
        raise ValueError(value)
    return number


def _checked_long(value, name: str) -> int:
    try:
        return _as_long(value)
    except ValueError:
        raise _ApiError(INVALID_INPUT, f"{name}: {value} is not a valid long") from None


def _optional_long(params: dict, name: str) -> int | None:
    value = params.get(name)
    return None if _is_missing(value) else _checked_long(value, name)


def _as_number(value) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise ValueError(value)
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(value) from None
    if not number.is_finite():
        raise ValueError(value)
    return number


def _parse_date(value) -> datetime | None:
    if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S" if " " in value else "%Y-%m-%d")
    except ValueError:
        return None


def _optional_date(params: dict, name: str) -> datetime | None:
    value = params.get(name)
    if _is_missing(value):
        return None
    parsed = _parse_date(value)
    if parsed is None:
        raise _ApiError(INVALID_DATE, f"invalid date format: {name} {value}")
    return parsed


def _receipt_id(params: dict) -> str | None:
    receipt_id = params.get("client_receipt_id")
    if _is_missing(receipt_id):
        return None
    if len(str(receipt_id)) > 50:
        raise _ApiError(INVALID_INPUT, "client_receipt_id: longer than 50 characters")
    return str(receipt_id)


def _history_row(record: dict) -> dict:
    """Return a stored record as a get_usage_history_m row (Aria's names plus short aliases)."""
    return {
        "usage_rec_no": record["usage_rec_no"],
        "client_record_id": record["client_record_id"],
        "acct_no": record["acct_no"],
        "client_acct_id": record["client_acct_id"],
        "incurring_acct_no": record["acct_no"],
        "billable_acct_no": record["acct_no"],
        "client_incurring_acct_id": record["client_acct_id"],
        "client_billable_acct_id": record["client_acct_id"],
        "usage_type_no": record["usage_type_no"],
        "usage_type_code": record["usage_type_code"],
        "usage_date": record["usage_date"],
        "usage_time": record["usage_date"][11:],
        "units": record["units"],
        "recorded_units": record["units"],
        "amount": record["amount"],
        "specific_record_charge_amount": record["amt"],
        "pre_rated_rate": record["rate"],
        **{f"qualifier_{n}": record[f"qualifier_{n}"] for n in range(1, 5)},
        "comments": record["comments"],
        "telco_from": record["telco_from"],
        "telco_to": record["telco_to"],
        "is_excluded": record["exclude_from_billing"],
        "exclusion_comments": record["exclusion_comments"],
        "usage_parent_rec_no": record["parent_usage_rec_no"],
    }


def _error(code: int, message: str) -> dict:
    return {"error_code": code, "error_msg": message}


# Answers that are not Aria's JSON, each built from the real answer: (body, content type).
MALFORMED_BODIES: dict[str, Callable[[dict], tuple[bytes, str]]] = {
    "truncated": lambda r: (json.dumps(r, default=_json_default).encode()[:-3],
                            "application/json"),
    "html": lambda r: (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    "empty": lambda r: (b"", "application/json"),
    "array": lambda r: (json.dumps([r], default=_json_default).encode(), "application/json"),
    "no_error_code": lambda r: (b'{"error_msg": "OK"}', "application/json"),
}


def _json_default(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _call_line(entry: dict, delivered: bool) -> str:
    line = (
        f"call #{entry['id']} {entry['path']} {entry['rest_call'] or '-'} "
        f"receipt={entry['client_receipt_id'] or '-'} recs={entry['usage_rec_count']} "
        f"-> HTTP {entry['http_status']}"
    )
    if entry["injected"]:
        line += f" (injected by {entry['injected']})"
        if entry.get("stored"):
            line += f" after storing {entry['stored']}"
    else:
        line += (
            f" error_code={entry['error_code']} stored={entry['stored']} "
            f"error_records={entry['error_records']}"
        )
    if entry.get("malformed"):
        line += f", body malformed ({entry['malformed']})"
    if entry["late_answer_seconds"]:
        line += f", answered {entry['late_answer_seconds']} s late"
    if not delivered:
        line += ", client gone before the answer"
    return line


def _log_to_stderr(line: str) -> None:
    print(f"{_now_text()} aria-simulator {line}", file=sys.stderr, flush=True)


# --- configuration values ------------------------------------------------------------------


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _config_long(value, name: str) -> int:
    try:
        return _as_long(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {value!r}") from None


def _config_seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal) or value < 0:
        raise ConfigError(f"{name} must be a non-negative number, not {value!r}")
    return float(value)


def _config_bogus(value) -> list[str] | int:
    if isinstance(value, list):
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError("bogus_error_records: a list of client_record_id strings")
        return value
    count = _config_long(value, "bogus_error_records")
    if count < 0:
        raise ConfigError("bogus_error_records must not be negative")
    return count


def _config_latency(value, name: str = "latency_seconds") -> tuple[float, float]:
    if isinstance(value, dict):
        value = [value.get("min", 0), value.get("max", value.get("min", 0))]
    if isinstance(value, list) and len(value) == 2:
        low, high = (_config_seconds(v, name) for v in value)
        if low > high:
            raise ConfigError(f"{name}: min is greater than max")
        return low, high
    seconds = _config_seconds(value, name)
    return seconds, seconds


def load_config_file(path: str, base: SimulatorConfig) -> SimulatorConfig:
    """Return `base` with the knobs of a JSON file (the POST /_sim/config shape) applied."""
    try:
        with open(path, encoding="utf-8") as file:
            changes = json.load(file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: {error}") from error
    config = copy.deepcopy(base)
    config.apply(changes)
    return config

