"""The validator's edges that the API and file tests do not reach."""

import pytest

from tests.factories import event_payload
from usage_sync.ingest import validate_event, validate_row


@pytest.mark.parametrize(
    ("units", "message"),
    [
        # More digits than decimal's context holds (28): quantize could not answer.
        ("1234567890123456789012345.1234567", "At most 6 decimal places."),
        ("1234567890123456789012345.1000000", "Must be smaller than 10^14."),
        ("99999999999999.9999990", None),
        ("100000000000000", "Must be smaller than 10^14."),
        ("0.0000001", "At most 6 decimal places."),
        ("1E-7", "At most 6 decimal places."),
        ("1.000000000000000000000000000000", None),
    ],
)
def test_decimals_of_any_length_are_checked_without_a_crash(units, message):
    event, errors = validate_event(0, event_payload(1, usage_units=units))

    assert [e.message for e in errors] == ([message] if message else [])
    assert (event is None) == bool(message)


def test_a_row_is_the_event_s_values_in_column_order():
    payload = event_payload(1, acct_no=7, amount="1.50", qualifier_2="x")

    row, _ = validate_row(0, payload)
    event, _ = validate_event(0, payload)

    assert row == tuple(getattr(event, f) for f in event.__slots__)
