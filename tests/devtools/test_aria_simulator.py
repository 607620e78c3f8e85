"""The core Aria simulator, run as a real process and spoken to over HTTP (no database)."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

BASE_DIR = Path(__file__).resolve().parents[2]
CLIENT_NO = 7001
AUTH_KEY = "test-secret-key-xyz"
START_TIMEOUT_SECONDS = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    """Start the simulator command and wait until /_sim/health answers."""
    port = _free_port()
    log_path = tmp_path / f"simulator-{port}.log"
    command = [
        sys.executable, str(BASE_DIR / "manage.py"), "core_aria_simulator", "--port", str(port),
        "--client-no", str(CLIENT_NO), "--auth-key", AUTH_KEY, *extra,
    ]
    # The log goes to a file: a pipe nobody reads would block the server once full.
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=BASE_DIR, stderr=log, stdout=log)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        try:
            if requests.get(f"{base_url}/_sim/health", timeout=1).ok:
                return process, base_url, log_path
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"the simulator did not start:\n{log_path.read_text()}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(signum)
        try:
            return process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    process, base_url, log_path = _start(tmp_path_factory.mktemp("aria-simulator"))
    yield Simulator(base_url, log_path)
    _stop(process)


@pytest.fixture(autouse=True)
def fresh_simulator(request):
    """Give each test that uses the simulator empty records and the start-up knobs."""
    if "simulator" in request.fixturenames:
        request.getfixturevalue("simulator").admin_post("reset")


class Simulator:
    def __init__(self, base_url: str, log_path: Path):
        self.base_url = base_url
        self.log_path = log_path
        self.api_url = f"{base_url}/v1/core"

    def call(self, rest_call: str, *, timeout: float = 5, **params) -> requests.Response:
        body = {"rest_call": rest_call, "output_format": "json", "client_no": CLIENT_NO,
                "auth_key": AUTH_KEY, **params}
        return requests.post(self.api_url, json=body, timeout=timeout)

    def bulk(self, usage_recs: list[dict], **params) -> dict:
        response = self.call("bulk_record_usage_m", usage_recs=usage_recs, **params)
        assert response.status_code == 200
        return response.json()

    def history(self, **params) -> dict:
        response = self.call("get_usage_history_m", **params)
        assert response.status_code == 200
        return response.json()

    def records(self, **filters) -> list[dict]:
        response = requests.get(f"{self.base_url}/_sim/records", params=filters, timeout=5)
        return response.json()["records"]

    def admin_get(self, name: str) -> dict:
        return requests.get(f"{self.base_url}/_sim/{name}", timeout=5).json()

    def admin_post(self, name: str, body: dict | None = None) -> dict:
        response = requests.post(f"{self.base_url}/_sim/{name}", json=body or {}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()


def rec(client_record_id: str, account: str = "ACME-001", **fields) -> dict:
    return {"client_acct_id": account, "usage_type_code": "API_CALLS", "usage_units": 10,
            "usage_date": "2024-05-01 10:00:00", "client_record_id": client_record_id, **fields}


def test_a_json_bulk_call_stores_every_record_and_answers_ok(simulator):
    answer = simulator.bulk(
        [rec("r-1"), rec("r-2", account="ACME-002", usage_units="2.5", qualifier_1="EU")],
        client_receipt_id="receipt-1",
    )

    assert answer == {"error_code": 0, "error_msg": "OK"}
    stored = {r["client_record_id"]: r for r in simulator.records()}
    assert set(stored) == {"r-1", "r-2"}
    assert stored["r-2"]["acct_no"] == 1002
    assert stored["r-2"]["units"] == 2.5
    assert stored["r-2"]["qualifier_1"] == "EU"
    assert stored["r-1"]["client_receipt_id"] == "receipt-1"
    assert stored["r-1"]["usage_rec_no"] != stored["r-2"]["usage_rec_no"]


def test_a_form_encoded_bulk_call_with_indexed_keys_is_stored(simulator):
    form = {
        "rest_call": "bulk_record_usage_m", "client_no": str(CLIENT_NO), "auth_key": AUTH_KEY,
        "client_receipt_id": "form-1",
        "usage_recs[0][acct_no]": "1003", "usage_recs[0][usage_type_code]": "SMS",
        "usage_recs[0][usage_units]": "4", "usage_recs[0][client_record_id]": "f-1",
        "usage_recs[1][client_acct_id]": "UNKNOWN-9", "usage_recs[1][usage_type_code]": "SMS",
        "usage_recs[1][usage_units]": "1", "usage_recs[1][client_record_id]": "f-2",
    }
    url = simulator.base_url + "/api/ws/api_ws_class_dispatcher.php"

    answer = requests.post(url, data=form, timeout=5).json()

    assert [e["out_client_record_id"] for e in answer["error_records"]] == ["f-2"]
    [stored] = simulator.records()
    assert (stored["client_record_id"], stored["acct_no"], stored["units"]) == ("f-1", 1003, 4)


def test_a_form_encoded_bulk_call_may_carry_usage_recs_as_a_json_string(simulator):
    form = {
        "rest_call": "bulk_record_usage_m", "client_no": str(CLIENT_NO), "auth_key": AUTH_KEY,
        "usage_recs": json.dumps([rec("j-1"), rec("j-2")]),
    }

    answer = requests.post(simulator.api_url, data=form, timeout=5).json()

    assert answer == {"error_code": 0, "error_msg": "OK"}
    assert len(simulator.records()) == 2


def test_a_wrong_auth_key_is_an_authentication_error_for_the_whole_call(simulator):
    response = requests.post(simulator.api_url, json={
        "rest_call": "bulk_record_usage_m", "client_no": CLIENT_NO, "auth_key": "wrong",
        "usage_recs": [rec("a-1")],
    }, timeout=5)

    assert response.status_code == 200
    assert response.json() == {"error_code": 1004, "error_msg": "authentication error"}
    assert simulator.records() == []


def test_a_missing_client_no_is_a_missing_input(simulator):
    response = requests.post(simulator.api_url, json={
        "rest_call": "bulk_record_usage_m", "auth_key": AUTH_KEY, "usage_recs": [rec("m-1")],
    }, timeout=5)

    assert response.json() == {
        "error_code": 1010, "error_msg": "Missing input: client_no is required"
    }


def test_an_unknown_rest_call_is_api_not_found(simulator):
    assert simulator.call("no_such_call_m").json() == {
        "error_code": -1, "error_msg": "API not found"
    }


def test_a_body_that_cannot_be_parsed_is_error_1012(simulator):
    response = requests.post(
        simulator.api_url, data=b"{not json", headers={"Content-Type": "application/json"},
        timeout=5,
    )

    assert response.status_code == 200
    assert response.json() == {"error_code": 1012, "error_msg": "unable to parse input"}


def test_only_post_is_allowed_on_the_api(simulator):
    response = requests.get(simulator.api_url, timeout=5)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_a_mixed_batch_reports_only_the_failed_records_by_client_record_id(simulator):
    answer = simulator.bulk([
        rec("ok-1"),
        rec("bad-1", account="UNKNOWN-001"),
        rec("ok-2", account="ACME-003"),
        rec("bad-2", account="UNKNOWN-002"),
    ])

    assert answer["error_code"] == 1009  # the first failed record's code (our choice)
    errors = {e["out_client_record_id"]: e for e in answer["error_records"]}
    assert set(errors) == {"bad-1", "bad-2"}
    assert errors["bad-1"] == {
        "out_client_record_id": "bad-1", "acct_no": None, "record_error_code": 1009,
        "record_error_msg": "Account not found: ClientId UNKNOWN-001",
    }
    assert {r["client_record_id"] for r in simulator.records()} == {"ok-1", "ok-2"}


def test_each_invalid_record_gets_arias_code_and_message(simulator):
    answer = simulator.bulk([
        {"usage_type_code": "API_CALLS", "usage_units": 1, "client_record_id": "no-account"},
        {"acct_no": "12ab", "usage_type_code": "API_CALLS", "usage_units": 1,
         "client_record_id": "bad-acct-no"},
        {"acct_no": 4242, "usage_type_code": "API_CALLS", "usage_units": 1,
         "client_record_id": "unknown-acct-no"},
        rec("no-units", usage_units=None),
        rec("text-units", usage_units="many"),
        rec("no-type", usage_type_code=None),
        rec("unknown-type", usage_type_code="TELEPORTS"),
        rec("iso-date", usage_date="2024-05-01T10:00:00"),
        rec("date-only", usage_date="2024-05-01"),
        rec("x" * 51),
    ])

    errors = {
        e["out_client_record_id"]: (e["record_error_code"], e["record_error_msg"])
        for e in answer["error_records"]
    }
    assert errors == {
        "no-account": (1010, "Missing input: acct_no is required"),
        "bad-acct-no": (1016, "acct_no: 12ab is not a valid long"),
        "unknown-acct-no": (1009, "Account not found: AriaNo 4242"),
        "no-units": (1010, "Missing input: usage_units is required"),
        "text-units": (1016, "usage_units: many is not a valid number"),
        "no-type": (1010, "Missing input: usage_type is required"),
        "unknown-type": (1017, "invalid usage type code"),
        "iso-date": (1024, "invalid date format: usage_date 2024-05-01T10:00:00"),
        "x" * 51: (1016, "client_record_id: longer than 50 characters"),
    }
    [stored] = simulator.records()
    assert stored["usage_date"] == "2024-05-01 00:00:00"


def test_the_partial_error_code_knob_sets_the_top_level_code(simulator):
    simulator.admin_post("config", {"partial_error_code": 0})

    answer = simulator.bulk([rec("ok"), rec("bad", account="UNKNOWN-1")])

    assert (answer["error_code"], answer["error_msg"]) == (0, "OK")
    assert [e["out_client_record_id"] for e in answer["error_records"]] == ["bad"]


def test_it_stores_a_duplicate_client_record_id_twice_like_core_aria(simulator):
    simulator.bulk([rec("dup-1")])
    simulator.bulk([rec("dup-1")])

    stored = simulator.records(client_record_id="dup-1")
    assert len(stored) == 2
    assert stored[0]["usage_rec_no"] != stored[1]["usage_rec_no"]
    assert simulator.admin_get("state")["records_stored"] == 2


def test_record_usage_m_stores_one_flat_record_and_returns_its_number(simulator):
    response = simulator.call("record_usage_m", **rec("single-1"), client_receipt_id="one")

    answer = response.json()
    assert (answer["error_code"], answer["error_msg"]) == (0, "OK")
    [stored] = simulator.records()
    assert stored["usage_rec_no"] == answer["usage_rec_no"]
    assert (stored["client_record_id"], stored["client_receipt_id"]) == ("single-1", "one")


def test_usage_history_finds_records_by_account_and_date_range(simulator):
    simulator.bulk([
        rec("h-1", usage_date="2024-05-01 10:00:00"),
        rec("h-2", usage_date="2024-05-02 10:00:00"),
        rec("h-3", usage_date="2024-05-02 11:00:00", usage_type_code="SMS"),
        rec("h-4", account="ACME-002", usage_date="2024-05-02 10:00:00"),
    ])

    answer = simulator.history(client_acct_id="ACME-001", date_range_start="2024-05-02",
                               date_range_end="2024-05-03")
    by_number = simulator.history(acct_no=1001, date_range_start="2024-05-02 00:00:00",
                                  specified_usage_type_code="SMS")
    paged = simulator.history(client_acct_id="ACME-001", date_range_start="2024-01-01",
                              limit=1, offset=1)

    assert answer["error_code"] == 0
    assert [r["client_record_id"] for r in answer["usage_history_recs"]] == ["h-2", "h-3"]
    row = answer["usage_history_recs"][0]
    assert (row["acct_no"], row["client_acct_id"], row["usage_type_code"]) == (
        1001, "ACME-001", "API_CALLS"
    )
    assert (row["usage_date"], row["units"]) == ("2024-05-02 10:00:00", 10)
    assert [r["client_record_id"] for r in by_number["usage_history_recs"]] == ["h-3"]
    assert [r["client_record_id"] for r in paged["usage_history_recs"]] == ["h-2"]


def test_usage_history_finds_records_by_client_record_id(simulator):
    simulator.bulk([rec("c-1"), rec("c-2", account="ACME-004")])

    answer = simulator.history(client_record_id="c-2")

    [row] = answer["usage_history_recs"]
    assert (row["client_record_id"], row["acct_no"]) == ("c-2", 1004)


def test_usage_history_needs_an_account_and_a_start_date_like_core_aria(simulator):
    assert simulator.history(date_range_start="2024-05-01")["error_code"] == 1010
    assert simulator.history(acct_no=1001)["error_msg"] == (
        "Missing input: date_range_start is required"
    )
    assert simulator.history(client_acct_id="UNKNOWN-1", date_range_start="2024-05-01") == {
        "error_code": 1009, "error_msg": "Account not found: ClientId UNKNOWN-1"
    }


def test_fail_next_n_answers_http_500_then_recovers(simulator):
    simulator.admin_post("config", {"fail_next_n": 2})

    statuses = [
        simulator.call("bulk_record_usage_m", usage_recs=[rec(f"burst-{n}")]).status_code
        for n in range(3)
    ]

    assert statuses == [500, 500, 200]
    assert [r["client_record_id"] for r in simulator.records()] == ["burst-2"]
    assert simulator.admin_get("state")["http_500s"] == 2


def test_the_error_rate_is_repeatable_with_a_seed(simulator):
    def statuses():
        simulator.admin_post("config", {"error_rate": 0.5, "seed": 42})
        return [simulator.call("get_usage_history_m", acct_no=1001,
                               date_range_start="2024-01-01").status_code for _ in range(12)]

    first = statuses()

    assert set(first) == {200, 500}
    assert statuses() == first


def test_a_late_answer_times_out_the_client_but_the_records_are_stored(simulator):
    simulator.admin_post("config", {"late_answer_seconds": 2})

    with pytest.raises(requests.Timeout):
        simulator.call("bulk_record_usage_m", usage_recs=[rec("late-1")], timeout=0.5)

    assert [r["client_record_id"] for r in simulator.records()] == ["late-1"]


def test_a_late_store_stores_the_records_after_the_client_gave_up(simulator):
    simulator.admin_post("config", {"late_store_seconds": [1, 1]})

    with pytest.raises(requests.Timeout):
        simulator.call("bulk_record_usage_m", usage_recs=[rec("later-1")], timeout=0.3)
    # Not stored yet when the client gives up; a lookup now finds nothing.
    assert simulator.records() == []
    assert simulator.history(client_record_id="later-1")["usage_history_recs"] == []

    time.sleep(1.2)
    assert [r["client_record_id"] for r in simulator.records()] == ["later-1"]


def test_anonymous_error_records_name_no_record(simulator):
    simulator.admin_post("config", {"anonymous_error_records": True})

    answer = simulator.bulk([rec("anon-1"), rec("anon-2", account="UNKNOWN-1")])

    assert answer["error_code"] == 1009
    assert [e["out_client_record_id"] for e in answer["error_records"]] == [None]
    assert [r["client_record_id"] for r in simulator.records()] == ["anon-1"]


def test_latency_delays_every_api_answer(simulator):
    simulator.admin_post("config", {"latency_seconds": [0.3, 0.3]})
    started = time.monotonic()

    simulator.bulk([rec("slow-1")])

    assert time.monotonic() - started >= 0.3


def test_adding_an_account_at_runtime_lets_a_failed_record_through(simulator):
    record = rec("new-1", account="NEWCO-001")
    first = simulator.bulk([record])

    config = simulator.admin_post(
        "config", {"accounts": [{"acct_no": 5001, "client_acct_id": "NEWCO-001"}]}
    )
    second = simulator.bulk([record])

    assert first["error_records"][0]["record_error_code"] == 1009
    assert {"acct_no": 5001, "client_acct_id": "NEWCO-001", "userid": "NEWCO-001"} in (
        config["accounts"]
    )
    assert second == {"error_code": 0, "error_msg": "OK"}
    assert simulator.records()[0]["acct_no"] == 5001


def test_unknown_prefixed_accounts_can_never_be_added(simulator):
    response = requests.post(f"{simulator.base_url}/_sim/config",
                             json={"accounts": ["UNKNOWN-7"]}, timeout=5)

    assert response.status_code == 400


def test_reset_forgets_records_and_runtime_knobs(simulator):
    simulator.admin_post("config", {"fail_next_n": 5, "accounts": ["TEMP-1"]})
    simulator.admin_post("reset")

    answer = simulator.bulk([rec("after-reset"), rec("temp", account="TEMP-1")])

    assert [e["out_client_record_id"] for e in answer["error_records"]] == ["temp"]
    assert simulator.admin_get("state")["calls"] == 1


def test_the_call_log_and_stderr_never_hold_the_auth_key(simulator):
    simulator.bulk([rec("log-1"), rec("log-2")], client_receipt_id="receipt-log")
    requests.post(simulator.api_url, json={
        "rest_call": "bulk_record_usage_m", "client_no": CLIENT_NO, "auth_key": "wrong-key-123",
        "usage_recs": [rec("log-3")],
    }, timeout=5)

    calls = simulator.admin_get("calls")["calls"]

    assert calls[0]["rest_call"] == "bulk_record_usage_m"
    assert calls[0]["client_receipt_id"] == "receipt-log"
    assert calls[0]["client_record_ids"] == ["log-1", "log-2"]
    assert (calls[0]["error_code"], calls[0]["stored"]) == (0, 2)
    assert calls[1]["error_code"] == 1004
    log = simulator.log_path.read_text()
    assert "receipt=receipt-log recs=2" in log
    for text in (json.dumps(calls), log):
        assert AUTH_KEY not in text
        assert "wrong-key-123" not in text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_it_starts_from_a_config_file_and_flags_and_stops_cleanly(tmp_path, signum):
    config_file = tmp_path / "simulator.json"
    config_file.write_text(json.dumps({"accounts": ["FILE-001"], "reset_usage_types": True,
                                       "usage_types": ["FILE_TYPE"]}))
    process, base_url, log_path = _start(
        tmp_path, "--config", str(config_file), "--usage-type", "FLAG_TYPE", "--account",
        "6001=FLAG-001",
    )
    try:
        config = requests.get(f"{base_url}/_sim/state", timeout=5).json()["config"]
    finally:
        status = _stop(process, signum)

    assert status == 0
    assert set(config["usage_types"]) == {"FILE_TYPE", "FLAG_TYPE"}
    accounts = {a["client_acct_id"] for a in config["accounts"]}
    assert {"FILE-001", "FLAG-001", "ACME-001"} <= accounts
    assert config["client_no"] == CLIENT_NO
    assert "stopped" in log_path.read_text()


def test_flapping_cycles_http_500s_and_answers_without_storing_the_failed_calls(simulator):
    simulator.admin_post("config", {"flap_fail_calls": 2, "flap_pass_calls": 1})

    statuses = [
        simulator.call("bulk_record_usage_m", usage_recs=[rec(f"flap-{n}")]).status_code
        for n in range(6)
    ]

    assert statuses == [500, 500, 200, 500, 500, 200]
    assert [r["client_record_id"] for r in simulator.records()] == ["flap-2", "flap-5"]


def test_fail_after_store_answers_500_but_keeps_the_records(simulator):
    simulator.admin_post("config", {"fail_next_n": 1, "fail_after_store": True})

    response = simulator.call("bulk_record_usage_m", usage_recs=[rec("stored-then-500")])

    assert response.status_code == 500
    assert [r["client_record_id"] for r in simulator.records()] == ["stored-then-500"]


def test_malformed_answers_come_after_the_records_were_stored(simulator):
    simulator.admin_post("config", {"malformed_next_n": 5})

    bodies = []
    for n in range(5):
        response = simulator.call("bulk_record_usage_m", usage_recs=[rec(f"garbled-{n}")])
        assert response.status_code == 200
        bodies.append(response.content)
    normal = simulator.call("bulk_record_usage_m", usage_recs=[rec("clean")])

    for body in bodies:
        try:
            parsed = json.loads(body)
        except ValueError:
            continue  # truncated, HTML or empty: not JSON at all
        assert not isinstance(parsed, dict) or "error_code" not in parsed
    assert len(set(bodies)) == 5  # each malformed kind once
    assert normal.json() == {"error_code": 0, "error_msg": "OK"}
    assert len(simulator.records()) == 6
    kinds = [c.get("malformed") for c in simulator.admin_get("calls")["calls"]]
    assert sorted(filter(None, kinds)) == ["array", "empty", "html", "no_error_code",
                                           "truncated"]


def test_the_malformed_rate_is_repeatable_with_a_seed(simulator):
    def kinds():
        simulator.admin_post("reset")
        simulator.admin_post("config", {"malformed_rate": 0.5, "seed": 7})
        for _ in range(12):
            simulator.call("get_usage_history_m", acct_no=1001, date_range_start="2024-01-01")
        return [c.get("malformed") for c in simulator.admin_get("calls")["calls"]]

    first = kinds()

    assert None in first and any(first)
    assert kinds() == first


def test_bogus_error_records_name_ids_that_were_not_in_the_call(simulator):
    simulator.admin_post("config", {"bogus_error_records": ["AU999-1", "real-2"]})

    answer = simulator.bulk([rec("real-1"), rec("real-2")])  # real-2 was in the call: left out

    assert answer["error_code"] == 1001
    assert [e["out_client_record_id"] for e in answer["error_records"]] == ["AU999-1"]
    assert sorted(r["client_record_id"] for r in simulator.records()) == ["real-1", "real-2"]
    simulator.admin_post("config", {"bogus_error_records": 2, "partial_error_code": 0})
    answer = simulator.bulk([rec("real-3", account="UNKNOWN-1")])
    assert answer["error_code"] == 0
    assert [e["out_client_record_id"] for e in answer["error_records"]] == [
        "real-3", "BOGUS-2-1", "BOGUS-2-2"
    ]


def test_bad_fault_knob_values_are_refused(simulator):
    for knobs in ({"flap_fail_calls": -1}, {"malformed_rate": 2}, {"fail_after_store": 1},
                  {"bogus_error_records": [3]}, {"anonymous_error_records": "yes"},
                  {"late_store_seconds": [3, 1]}):
        response = requests.post(f"{simulator.base_url}/_sim/config", json=knobs, timeout=5)
        assert response.status_code == 400, knobs
    assert simulator.admin_get("state")["config"]["flap_fail_calls"] == 0


def test_forget_drops_stored_records_by_client_record_id(simulator):
    simulator.bulk([rec("keep"), rec("drop"), rec("drop")])

    assert simulator.admin_post("forget", {"client_record_ids": ["drop"]}) == {"forgotten": 2}

    assert [r["client_record_id"] for r in simulator.records()] == ["keep"]
    response = requests.post(f"{simulator.base_url}/_sim/forget", json={"client_record_ids": 1},
                             timeout=5)
    assert response.status_code == 400
