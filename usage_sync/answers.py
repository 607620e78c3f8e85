"""Map a bulk_record_usage_m answer back onto the records of the call.

The answer has no record index: an error record names its record only through
`out_client_record_id`. When every error record names a record of the call, the answer is
mapped: those records are ERROR with their own code and message, the others COMPLETE (or,
when the whole call was refused before any record was looked at, e.g. 1004, all ERROR).
When anything cannot be mapped (an error record naming an id we did not send, or none, an
item that is not an error record at all, or another top-level error naming no record),
nobody can tell which records core Aria stored: those not named are in doubt, never
COMPLETE by default (README, "How the sync protects the money").
"""

from __future__ import annotations

import dataclasses

from .billing import BulkResult

# A record of the call that core Aria reported in error: its code and message.
Failure = tuple[str, str]

# Top-level codes that refuse the whole call before any record is looked at: API not
# found, authentication, missing input, unparsable input. Any other top-level error
# without error records may have come after some records were stored.
WHOLE_CALL_REFUSED = frozenset({"-1", "1004", "1010", "1012"})


@dataclasses.dataclass(frozen=True)
class MappedAnswer:
    failed: dict[int, Failure]
    """Records core Aria refused, by record id: ERROR, whatever else the answer says."""
    unmapped: list[str]
    """What could not be mapped, described for the activity log (empty: fully mapped)."""
    doubt: Failure = ("", "")
    """The call's code and message, for the records in doubt (when `unmapped`)."""

    @property
    def in_doubt(self) -> bool:
        return bool(self.unmapped)


def map_answer(result: BulkResult, sent: dict[str, int]) -> MappedAnswer:
    """Map `result` onto the records of the call (`sent`: client_record_id -> record id)."""
    failed: dict[int, Failure] = {}
    unmapped = [f"not an error record: {item}" for item in result.malformed_items]
    for error in result.record_errors:
        record_id = sent.get(error.client_record_id)
        if record_id is None:
            unmapped.append(
                f"error record {error.code} for "
                + (repr(error.client_record_id) if error.client_record_id else "no id")
                + ", which was not in the call"
            )
        else:
            failed.setdefault(record_id, (error.code, error.message))
    if not result.ok and not result.record_errors and not result.malformed_items:
        if result.error_code in WHOLE_CALL_REFUSED:
            # E.g. 1004: the whole call was refused, nothing of it stored.
            return MappedAnswer(
                {r: (result.error_code, result.error_msg) for r in sent.values()}, []
            )
        unmapped.append(f"error {result.error_code} for the whole call, naming no record")
    if not unmapped:
        return MappedAnswer(failed, [])
    if result.ok:
        # The top-level code says nothing; the first error record that named no record of
        # ours is the best description of what went wrong.
        first = next((e for e in result.record_errors if e.client_record_id not in sent), None)
        doubt = (first.code, first.message) if first else ("UNMAPPED", "unreadable error record")
    else:
        doubt = (result.error_code, result.error_msg)
    return MappedAnswer(failed, unmapped, doubt)
