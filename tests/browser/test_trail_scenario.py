"""A billing dispute in the browser: from an event id to its record and batch, a reprocess,
and the record's history gaining the new call."""

from datetime import UTC, datetime, timedelta

import pytest
import responses
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.factories import UserFactory, grant_reprocess
from usage_sync.aggregation import aggregate_usage
from usage_sync.billing import AriaClient
from usage_sync.ingest import store_events, validate_events
from usage_sync.models import UsageRecord
from usage_sync.sync import sync_batch

URL = "http://aria.test/v1/core"
DAY = datetime(2026, 11, 20, tzinfo=UTC)

pytestmark = pytest.mark.django_db(transaction=True)


def wait(browser, timeout=10):
    return WebDriverWait(browser, timeout)


def sync(batch_id: int, answer: dict) -> None:
    with responses.RequestsMock() as aria:
        aria.post(URL, json=answer)
        sync_batch(batch_id=batch_id, client=AriaClient(url=URL, client_no=1, auth_key="k"))


def test_an_operator_follows_an_event_to_its_record_and_batch_and_reprocesses_it(
    live_server, browser, shoot, published
):
    grant_reprocess(UserFactory(username="ops"))
    raw = [{"event_id": f"{account}-{n}", "client_acct_id": account, "usage_type_code": "GB",
            "usage_units": "2.5", "usage_date": (DAY + timedelta(minutes=n)).isoformat()}
           for account in ("ACME-1", "NEWCO-7") for n in range(4)]
    store_events(validate_events(raw)[0])
    [batch_id] = aggregate_usage(now=DAY + timedelta(days=1)).batch_ids
    failing = UsageRecord.objects.get(client_acct_id="NEWCO-7")
    sync(batch_id, {"error_code": 1009, "error_msg": "account does not exist",
                    "error_records": [{"out_client_record_id": failing.client_record_id,
                                       "record_error_code": 1009,
                                       "record_error_msg": "Account not found: NEWCO-7"}]})

    browser.get(live_server.url + "/")
    wait(browser).until(EC.presence_of_element_located((By.ID, "id_username")))
    browser.find_element(By.ID, "id_username").send_keys("ops")
    browser.find_element(By.ID, "id_password").send_keys("correct horse battery")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "form.search")))

    # "Was NEWCO-7-2 billed?": the search lands on the event, which names its record.
    search = browser.find_element(By.CSS_SELECTOR, "form.search input[name=q]")
    search.send_keys("NEWCO-7-2\n")
    wait(browser).until(EC.title_contains("Event NEWCO-7-2"))
    went = browser.find_element(By.ID, "event-record").text
    assert failing.client_record_id in went and "ERROR" in went
    shoot("12-trail-event")

    browser.find_element(By.LINK_TEXT, failing.client_record_id).click()
    wait(browser).until(EC.title_contains(f"Record {failing.client_record_id}"))
    calls = browser.find_elements(By.CSS_SELECTOR, "#record-history tr.history-call")
    assert len(calls) == 1 and "ERROR 1009" in calls[0].text
    assert "They add up to the record." in browser.find_element(By.CSS_SELECTOR, ".sums").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#record-events tbody tr")) == 4

    # To its batch, and reprocess the batch's 1009 line once the account exists.
    browser.find_element(By.LINK_TEXT, f"Batch {batch_id}").click()
    wait(browser).until(EC.title_contains(f"Batch {batch_id}"))
    line = next(tr for tr in browser.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
                if "1009" in tr.text)
    line.find_element(By.LINK_TEXT, "Reprocess").click()
    wait(browser).until(EC.title_contains("Confirm reprocess"))
    browser.find_element(By.ID, "id_reason").send_keys("NEWCO-7 created in core Aria")
    browser.find_element(By.XPATH, "//button[text()='Confirm reprocess']").click()
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".message-success")))
    assert published == [[batch_id]]

    # A worker syncs the batch again (core Aria knows the account now).
    sync(batch_id, {"error_code": 0, "error_msg": "OK"})
    browser.get(live_server.url + f"/usage/records/{failing.pk}/")
    wait(browser).until(EC.title_contains(f"Record {failing.client_record_id}"))
    history = [tr.text for tr in browser.find_elements(By.CSS_SELECTOR, "#record-history tbody tr")]
    assert len(history) == 3, history
    assert "ERROR 1009" in history[0]
    assert "Reprocess run" in history[1] and "NEWCO-7 created in core Aria" in history[1]
    assert "COMPLETE" in history[2]
    shoot("13-trail-record")
