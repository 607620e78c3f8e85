"""The operator's path through the console in a real browser."""

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.factories import UserFactory, grant_reprocess, make_batch
from usage_sync.models import AggregatedBatch, RecordStatus, UsageRecord

LINES = "table.table-inner > tbody > tr"  # the summary's lines, not the outer table's rows


def wait(browser, timeout=10):
    return WebDriverWait(browser, timeout)


def test_operator_reprocesses_an_error_line(live_server, browser, shoot, published):  # noqa: F811
    user = UserFactory(username="ops")
    grant_reprocess(user)
    failing = make_batch(complete=3, errors={"1010": 4, "3020": 2}, pending=1)
    other = make_batch(complete=1, errors={"1010": 1})
    url = live_server.url

    # Log in.
    browser.get(url + "/")
    wait(browser).until(EC.presence_of_element_located((By.ID, "id_username")))
    shoot("01-login")
    browser.find_element(By.ID, "id_username").send_keys("ops")
    browser.find_element(By.ID, "id_password").send_keys("correct horse battery")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "aside.sidenav")))
    assert browser.find_element(By.CSS_SELECTOR, ".username").text == "ops"
    shoot("02-overview")

    # The Usage/Account toggle switches the navigation pane.
    browser.find_element(By.LINK_TEXT, "Account").click()
    wait(browser).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, "aside.sidenav[data-section=account]")))
    assert browser.find_element(By.CSS_SELECTOR, "aside.sidenav").text.strip().endswith("Accounts")
    shoot("10-accounts")
    browser.find_element(By.LINK_TEXT, "Usage").click()
    wait(browser).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, "aside.sidenav[data-section=usage]")))

    # Activity log and configuration render.
    browser.find_element(By.LINK_TEXT, "Activity log").click()
    wait(browser).until(EC.title_contains("Activity"))
    shoot("08-activity-log")
    browser.find_element(By.LINK_TEXT, "Aggregate usage configuration").click()
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "main h1")))
    shoot("09-configuration")

    # Aggregated usage, filtered by start date.
    browser.find_element(By.LINK_TEXT, "Aggregated usage").click()
    wait(browser).until(EC.title_contains("Aggregated usage"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-batch-id]")
    assert {r.get_attribute("data-batch-id") for r in rows} == {str(failing.pk), str(other.pk)}
    start = browser.find_element(By.ID, "id_start_date")
    browser.execute_script("arguments[0].value = arguments[1]", start,
                           failing.window_start.date().isoformat())
    browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait(browser).until(EC.url_contains("start_date="))
    shoot("03-aggregated-usage")

    # Expand the failing batch: the JS fetch loads its error summary.
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-batch-id='{failing.pk}']")
    row.find_element(By.CSS_SELECTOR, ".js-expand").click()
    summary = wait(browser).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, ".summary-row .summary")))
    lines = summary.find_elements(By.CSS_SELECTOR, LINES)
    assert len(lines) == 3, [tr.text for tr in lines]  # 1010, 3020, PENDING
    line = next(tr for tr in lines if "1010" in tr.text)
    assert line.find_element(By.CSS_SELECTOR, "td.num").text == "4"
    shoot("04-expanded-row")

    # Follow the line's records link: the records view, filtered to that line.
    line.find_element(By.LINK_TEXT, "View records").click()
    wait(browser).until(EC.url_contains("/usage/records/"))
    assert "error_code=1010" in browser.current_url
    record_rows = browser.find_elements(By.CSS_SELECTOR, "main .card tbody tr")
    assert len(record_rows) == 4
    shoot("05-records")
    browser.back()
    wait(browser).until(EC.title_contains("Aggregated usage"))

    # Reprocess the line through the confirmation.
    # (The back/forward cache may restore the page with the row still expanded.)
    if not browser.find_elements(By.CSS_SELECTOR, ".summary-row"):
        row = browser.find_element(By.CSS_SELECTOR, f"tr[data-batch-id='{failing.pk}']")
        row.find_element(By.CSS_SELECTOR, ".js-expand").click()
    summary = wait(browser).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, ".summary-row .summary")))
    line = next(tr for tr in summary.find_elements(By.CSS_SELECTOR, LINES)
                if "1010" in tr.text)
    line.find_element(By.LINK_TEXT, "Reprocess").click()
    wait(browser).until(EC.title_contains("Confirm reprocess"))
    assert browser.find_element(By.CSS_SELECTOR, ".js-records").text == "4"
    browser.find_element(By.ID, "id_reason").send_keys("Aria fixed the rate plan")
    shoot("06-confirmation")
    browser.find_element(By.XPATH, "//button[text()='Confirm reprocess']").click()
    message = wait(browser).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, ".message-success")))
    assert "queued 4 records in 1 batches" in message.text
    box = browser.find_element(By.CSS_SELECTOR, ".js-progress")
    assert "IN PROGRESS" in box.text
    assert published == [[failing.pk]]
    shoot("07-after-reprocess")

    # A worker re-syncs the batch: every incomplete record completes.
    UsageRecord.objects.filter(batch=failing).exclude(
        status=RecordStatus.COMPLETE).update(status=RecordStatus.COMPLETE, sync_error_code="",
                                             sync_error_message="")
    AggregatedBatch.objects.filter(pk=failing.pk).recount(release=True)

    # The progress box sees the run done and reloads the page without the batch.
    wait(browser, 15).until(lambda b: "run=" not in b.current_url)
    wait(browser).until(EC.title_contains("Aggregated usage"))
    ids = {r.get_attribute("data-batch-id")
           for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-batch-id]")}
    assert str(failing.pk) not in ids
    assert str(other.pk) in ids
    shoot("11-after-resync")
