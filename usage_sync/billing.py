"""The core Aria client: `bulk_record_usage_m` and `get_usage_history_m` over HTTP.

Core Aria's API (Aria Knowledge Central, the A7 API description): POST with a JSON body
whose `rest_call` names the method; API errors come back as HTTP 200 with a non-zero integer
`error_code`; any other HTTP status, or a body without an integer `error_code`, is a
transport failure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import requests
import urllib3
from django.conf import settings

from . import metrics

logger = logging.getLogger(__name__)

HISTORY_PAGE_SIZE = 1000
# How many times one history page is asked for before the lookup fails.
HISTORY_ATTEMPTS = 3
ACCOUNT_NOT_FOUND = "1009"


class AriaTransportError(Exception):
    """The call's outcome is unknown (connection error, timeout, HTTP ≠ 200, bad body).

    The records may have been stored by core Aria, now or later: reconcile them before
    sending them again. Unless `delivered` is False: the request never left this side (no
    connection could be opened), so core Aria cannot hold anything of it.
    """

    def __init__(self, message: str, *, delivered: bool = True):
        super().__init__(message)
        self.delivered = delivered


@dataclasses.dataclass(frozen=True)
class RecordError:
    client_record_id: str
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class BulkResult:
    error_code: str
    error_msg: str
    record_errors: tuple[RecordError, ...]
    # `error_records` items that are not error records at all (quoted for the log).
    malformed_items: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error_code == "0"


@dataclasses.dataclass(frozen=True)
class CallReport:
    """What a call sent and how long it took, for the activity log (never the auth_key)."""

    rest_call: str
    client_receipt_id: str
    record_count: int
    duration_ms: int


def _text(value) -> str:
    """Return Aria's value as text the database can store: PostgreSQL text and jsonb hold
    no NUL character, and UTF-8 no lone surrogate (both can arrive as JSON escapes)."""
    return str(value).replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _integer_code(value) -> str | None:
    """Return Aria's integer code as text ("0", "1009"), or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return str(int(value))
    return None


def _may_have_arrived(exc: requests.RequestException) -> bool:
    """Tell whether a failed request may have reached core Aria (False only when no
    connection could be opened: refused, unresolvable, or the connect timed out)."""
    if isinstance(exc, requests.ConnectTimeout):
        return False
    if isinstance(exc, requests.ConnectionError):
        cause = exc.args[0] if exc.args else None
        reason = getattr(cause, "reason", None)
        return not isinstance(reason, urllib3.exceptions.NewConnectionError)
    return True


def _row_key(row: dict) -> str:
    """Identify a usage history row: its usage record number, or all of it."""
    number = row.get("usage_rec_no")
    return f"no:{number}" if number is not None else json.dumps(row, sort_keys=True, default=str)


REDACTED = "***"
# A shorter key (a test's "k") would redact unrelated text.
MIN_REDACTED_KEY_LENGTH = 4


class AriaClient:
    """A `requests.Session` bound to one core Aria endpoint and client's credentials."""

    def __init__(
        self,
        *,
        url: str | None = None,
        client_no: int | None = None,
        auth_key: str | None = None,
        timeout: float | None = None,
        session: requests.Session | None = None,
    ):
        self.url = url or settings.ARIA_API_URL
        self.client_no = client_no if client_no is not None else settings.ARIA_CLIENT_NO
        self._auth_key = auth_key if auth_key is not None else settings.ARIA_AUTH_KEY
        self.timeout = timeout if timeout is not None else settings.ARIA_TIMEOUT_SECONDS
        self.session = session or requests.Session()
        self.last_call: CallReport | None = None

    def __repr__(self):  # keeps the auth_key out of logs and tracebacks
        return f"AriaClient(url={self.url!r}, client_no={self.client_no})"

    # API: bulk_record_usage_m (Aria Knowledge Central, "bulk_record_usage_m").
    def bulk_record_usage(
        self, *, usage_recs: Sequence[dict], client_receipt_id: str
    ) -> BulkResult:
        """Send records in one synchronous call; return Aria's per-record outcome."""
        body = self._call(
            "bulk_record_usage_m",
            {"client_receipt_id": client_receipt_id, "usage_recs": list(usage_recs)},
            client_receipt_id=client_receipt_id,
            record_count=len(usage_recs),
        )
        record_errors, malformed = [], []
        items = body.get("error_records") or []
        for item in items if isinstance(items, list) else [items]:
            code = _integer_code(item.get("record_error_code")) if isinstance(item, dict) else None
            if code is None:
                # Kept, not dropped: an answer with such items cannot be mapped.
                malformed.append(self._from_aria(repr(item))[:200])
                continue
            record_errors.append(
                RecordError(
                    # Empty when Aria named no record: nothing of ours can be matched to it.
                    client_record_id=_text(item.get("out_client_record_id") or ""),
                    code=code[:20],
                    message=self._from_aria(item.get("record_error_msg") or ""),
                )
            )
        return BulkResult(
            error_code=body["error_code"],
            error_msg=self._from_aria(body.get("error_msg") or ""),
            record_errors=tuple(record_errors),
            malformed_items=tuple(malformed),
        )

    # API: get_usage_history_m, filtered by account and date range, paged by limit/offset.
    def stored_client_record_ids(
        self, *, accounts: Iterable[tuple[str, int | None]], date_range: tuple[str, str],
        before_call: Callable[[], None] | None = None,
    ) -> set[str]:
        """Return the client_record_ids core Aria holds for these accounts in the range."""
        return set(self.stored_client_record_id_counts(
            accounts=accounts, date_range=date_range, before_call=before_call
        ))

    def stored_client_record_id_counts(
        self, *, accounts: Iterable[tuple[str, int | None]], date_range: tuple[str, str],
        before_call: Callable[[], None] | None = None,
    ) -> Counter[str]:
        """Count the usage records core Aria holds per client_record_id (2+ = billed twice).

        `before_call` runs before each call (the sync renews its claim there).
        """
        found: Counter[str] = Counter()
        seen: set[str] = set()
        start, end = date_range
        for client_acct_id, acct_no in accounts:
            if client_acct_id:
                account = {"client_acct_id": client_acct_id}
            else:
                account = {"acct_no": acct_no}
            offset = 0
            while True:
                body = self._read_history(
                    {**account, "date_range_start": start, "date_range_end": end,
                     "limit": HISTORY_PAGE_SIZE, "offset": offset},
                    before_call=before_call,
                )
                if body is None:
                    break  # an account Aria does not know holds no usage
                rows = [r for r in body.get("usage_history_recs") or [] if isinstance(r, dict)]
                new = [r for r in rows if _row_key(r) not in seen]
                seen.update(_row_key(r) for r in new)
                found.update(str(r["client_record_id"]) for r in new if r.get("client_record_id"))
                # Only a page with nothing new ends the history: a short one may be a page
                # size of core Aria's own, smaller than ours (missing a stored record here
                # would send it again); a page seen before means the offset was not taken.
                if not new:
                    break
                offset += len(rows)
        return found

    def _read_history(self, params: dict, *, before_call) -> dict | None:
        """One page of get_usage_history_m (None: the account is unknown to Aria).

        A read changes nothing in core Aria, so a failed one is simply asked again, a few
        times, before the lookup as a whole fails.
        """
        attempt = 1
        while True:
            if before_call:
                before_call()
            try:
                body = self._call("get_usage_history_m", params, client_receipt_id="",
                                  record_count=0)
                break
            except AriaTransportError:
                if attempt == HISTORY_ATTEMPTS:
                    raise
                attempt += 1
        code = body["error_code"]
        if code == ACCOUNT_NOT_FOUND:
            return None
        if code != "0":
            # Not a transport failure, but the records stay in doubt all the same.
            raise AriaTransportError(
                f"get_usage_history_m answered {code}: {self._from_aria(body.get('error_msg'))}"
            )
        return body

    def _from_aria(self, value) -> str:
        """Return text of Aria's answer fit to store, log and show: never our auth_key,
        should Aria quote the rejected credential back in a message."""
        text = _text(value)
        if len(self._auth_key) >= MIN_REDACTED_KEY_LENGTH:
            text = text.replace(self._auth_key, REDACTED)
        return text

    def _call(self, rest_call: str, params: dict, *, client_receipt_id: str, record_count: int):
        payload = {
            "rest_call": rest_call,
            "output_format": "json",
            "client_no": self.client_no,
            "auth_key": self._auth_key,
            **params,
        }
        started = time.monotonic()
        outcome = "transport"
        try:
            body = self._post(rest_call, payload)
            outcome = body["error_code"]
            return body
        finally:
            seconds = time.monotonic() - started
            self.last_call = CallReport(
                rest_call=rest_call,
                client_receipt_id=client_receipt_id,
                record_count=record_count,
                duration_ms=int(seconds * 1000),
            )
            metrics.observe_call(rest_call, seconds, outcome)
            logger.debug(
                "%s answered %s in %d ms",
                rest_call,
                outcome,
                seconds * 1000,
                extra={
                    "rest_call": rest_call,
                    "client_receipt_id": client_receipt_id,
                    "record_count": record_count,
                    "duration_ms": int(seconds * 1000),
                    "error_code": outcome,
                },
            )

    def _post(self, rest_call: str, payload: dict) -> dict:
        try:
            response = self.session.post(self.url, json=payload, timeout=self.timeout)
        except requests.RequestException as exc:
            raise AriaTransportError(
                f"{rest_call}: {type(exc).__name__}: {exc}", delivered=_may_have_arrived(exc)
            ) from None
        if response.status_code != 200:
            raise AriaTransportError(f"{rest_call}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise AriaTransportError(f"{rest_call}: the answer is not JSON") from None
        if not isinstance(body, dict) or "error_code" not in body:
            raise AriaTransportError(f"{rest_call}: the answer has no error_code")
        code = _integer_code(body["error_code"])
        if code is None:
            # null, "0.0", true …: not an answer we can read, so its outcome is unknown.
            shown = self._from_aria(repr(body["error_code"]))[:40]
            raise AriaTransportError(f"{rest_call}: its error_code {shown} is not an integer")
        return {**body, "error_code": code}


# --- bulk_record_usage_m's usage_recs[] elements -------------------------------------------

ARIA_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


USAGE_REC_FIELDS = (
    "id", "client_record_id", "client_acct_id", "acct_no", "usage_type_code", "usage_type",
    "usage_units", "usage_date", "amount", "rate",
    "qualifier_1", "qualifier_2", "qualifier_3", "qualifier_4",
)


def usage_rec(record) -> dict:
    """Build one `usage_recs[]` element of bulk_record_usage_m from a record (or a row
    with the USAGE_REC_FIELDS attributes)."""
    rec: dict = {"client_record_id": record.client_record_id}
    if record.client_acct_id:
        rec["client_acct_id"] = record.client_acct_id
    else:
        rec["acct_no"] = record.acct_no
    if record.usage_type_code:
        rec["usage_type_code"] = record.usage_type_code
    else:
        rec["usage_type"] = record.usage_type
    rec["usage_units"] = _number(record.usage_units)
    rec["usage_date"] = aria_date(record.usage_date)
    if record.amount is not None:
        rec["amt"] = _number(record.amount)
    elif record.rate is not None:
        rec["rate"] = _number(record.rate)
    for n in range(1, 5):
        if value := getattr(record, f"qualifier_{n}"):
            rec[f"qualifier_{n}"] = value
    return rec


def _number(value: Decimal):
    """Return a JSON number that is exactly the decimal, or its text when a float can't be."""
    value = value.normalize()
    as_float = float(value)
    return as_float if Decimal(repr(as_float)) == value else str(value)


# A batch's records share their window's start: formatted once, not once a record.
@functools.lru_cache(maxsize=1024)
def aria_date(moment: datetime) -> str:
    """Core Aria's date format (yyyy-mm-dd hh24:mi:ss), in UTC."""
    return moment.astimezone(UTC).strftime(ARIA_DATE_FORMAT)
