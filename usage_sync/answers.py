"""Map a bulk_record_usage_m answer back onto the records of the call.

The answer has no record index: an error record names its record only through
`out_client_record_id`. When every error record names a record of the call, the answer is
mapped: those records are ERROR with their own code and message, the others COMPLETE (or,
with a top-level error and no error records, the whole call ERROR). When anything cannot be
mapped (an error record naming an id we did not send, or none, or an item that is not an
error record at all), nobody can tell which of the unnamed records core Aria refused: they
are in doubt, never COMPLETE by default (README, "How the sync protects the money").
"""

from __future__ import annotations

import dataclasses

from .billing import BulkResult

# A record of the call that core Aria reported in error: its code and message.
Failure = tuple[str, str]


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
        # A top-level error without error records (e.g. 1004): the whole call failed.
        return MappedAnswer({r: (result.error_code, result.error_msg) for r in sent.values()}, [])
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
