"""Properties of the bulk_record_usage_m response mapping, with core Aria faked at the
HTTP transport (responses) and the records in PostgreSQL.

For any subset of the sent records reported in error_records, in any order, plus any
client_record_ids that were not in the call (some of them real records of another batch):
exactly the reported records become ERROR with their own code and message; every other
sent record is COMPLETE when the answer named nothing else, and otherwise stays in doubt
(PENDING, never COMPLETE by default); nothing outside the call changes, and the batch
counts add up.
"""

import json

import pytest
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import make_batch
from usage_sync.billing import AriaClient
from usage_sync.models import BatchStatus, RecordStatus, SyncActivity, UsageRecord
from usage_sync.sync import Outcome, sync_batch

URL = "http://aria.test/v1/core"

pytestmark = pytest.mark.django_db

# What core Aria may say about a record: any code, any message, even characters the
# database cannot store (NUL, lone surrogates: both arrive as JSON escapes).
# Aria's codes are integers (as JSON numbers or as text).
error_codes = st.one_of(
    st.integers(min_value=-1, max_value=99_999), st.sampled_from([1009, 1016]),
    st.integers(min_value=0, max_value=99_999).map(str),
)
# Items of error_records that are not error records: nothing can be read from them.
junk_items = st.lists(
    st.one_of(
        st.text(max_size=10), st.integers(), st.none(),
        st.fixed_dictionaries({"out_client_record_id": st.text(max_size=10),
                               "record_error_code": st.sampled_from(["", "1.5", None, "x"])}),
    ),
    max_size=2,
)
error_messages = st.one_of(st.text(max_size=200), st.sampled_from(["bad\x00input", "\ud800x"]))
unknown_ids = st.lists(
    st.one_of(st.text(min_size=1, max_size=50), st.sampled_from(["AU1-0\x00", "\udfff"])),
    max_size=5,
)


def stored_text(value) -> str:
    """What the database keeps of Aria's text: NUL dropped, lone surrogates replaced."""
    return str(value).replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


@st.composite
def answers(draw, sent_ids: list[str], bystander_ids: list[str]):
    """Return (the error_records Aria answers with, the reported sent id -> (code, msg))."""
    reported = draw(st.lists(st.sampled_from(sent_ids), unique=True)) if sent_ids else []
    outcome = {cid: (draw(error_codes), draw(error_messages)) for cid in reported}
    strangers = draw(unknown_ids).copy()
    strangers += draw(st.lists(st.sampled_from(bystander_ids), unique=True, max_size=3))
    strangers = [s for s in strangers if s not in sent_ids]
    error_records = [
        {"out_client_record_id": cid, "record_error_code": code, "record_error_msg": msg}
        for cid, (code, msg) in outcome.items()
    ] + [
        {"out_client_record_id": s, "record_error_code": draw(error_codes),
         "record_error_msg": draw(error_messages)}
        for s in strangers
    ]
    error_records = draw(st.permutations(error_records + draw(junk_items)))
    return error_records, outcome


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(size=st.integers(min_value=1, max_value=12), data=st.data())
def test_exactly_the_reported_records_become_error_and_the_rest_complete(size, data):
    bystanders = make_batch(errors={"1009": 2}, pending=1)
    bystander_before = list(
        bystanders.records.order_by("id").values_list("status", "sync_error_code")
    )
    batch = make_batch(pending=size)
    sent_ids = list(batch.records.values_list("client_record_id", flat=True))
    error_records, outcome = data.draw(
        answers(sent_ids, list(bystanders.records.values_list("client_record_id", flat=True)))
    )
    # With error_records present the top-level code does not decide (it is undocumented).
    top_code = data.draw(st.sampled_from([0, 1001])) if error_records else 0
    body = {"error_code": top_code, "error_msg": "OK" if top_code == 0 else "some failed",
            "error_records": error_records}

    with responses.RequestsMock() as aria:
        aria.post(URL, json=body)
        result = sync_batch(
            batch_id=batch.id, client=AriaClient(url=URL, client_no=1, auth_key="k", timeout=2)
        )
        [call] = aria.calls
    payload = json.loads(call.request.body)

    assert sorted(r["client_record_id"] for r in payload["usage_recs"]) == sorted(sent_ids)
    records = {r.client_record_id: r for r in batch.records.all()}
    # Anything beyond the reported records (a stranger's id, junk) cannot be mapped.
    unmapped = len(error_records) > len(outcome)
    for cid, record in records.items():
        if cid in outcome:
            code, message = outcome[cid]
            assert (record.status, record.sync_error_code, record.sync_error_message) == (
                RecordStatus.ERROR, stored_text(code)[:20], stored_text(message)
            ), cid
            assert record.sent_at is None
        elif unmapped:
            assert (record.status, record.sent_at is None) == (RecordStatus.PENDING, False), cid
        else:
            assert (record.status, record.sync_error_code) == (RecordStatus.COMPLETE, ""), cid
            assert record.sent_at is None
    # Ids that were not in the call mark nothing, even ids of real records elsewhere.
    assert list(
        bystanders.records.order_by("id").values_list("status", "sync_error_code")
    ) == bystander_before
    batch.refresh_from_db()
    errors = len(outcome)
    rest = size - errors
    completed, pending = (0, rest) if unmapped else (rest, 0)
    assert (batch.total_count, batch.error_count, batch.completed_count,
            batch.pending_count, batch.ignored_count) == (size, errors, completed, pending, 0)
    assert batch.total_count == (batch.error_count + batch.completed_count
                                 + batch.pending_count + batch.ignored_count)
    assert batch.status == (BatchStatus.PENDING if pending else BatchStatus.ERROR if errors
                            else BatchStatus.COMPLETE)
    assert (result.outcome, result.sent, result.errors, result.completed) == (
        Outcome.WAITING if unmapped else Outcome.SYNCED, size, errors, completed
    )
    activity = SyncActivity.objects.filter(batch=batch).latest("id")
    assert activity.record_count == size
    assert (activity.details["errors"], activity.details["completed"]) == (errors, completed)
    assert UsageRecord.objects.filter(batch=batch, status=RecordStatus.ERROR).count() == errors
