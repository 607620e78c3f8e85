"""The API documentation pages in headless Chromium: they render the app's own schema and
fetch nothing from anywhere but the application."""

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import browser  # noqa: F401  (headless Chromium, or a skip)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


def log_in(browser, live_server, next_path):  # noqa: F811
    UserFactory(username="reader")
    browser.get(f"{live_server.url}{next_path}")
    browser.find_element(By.ID, "id_username").send_keys("reader")
    browser.find_element(By.ID, "id_password").send_keys("correct horse battery")
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()


def fetched_urls(browser) -> list[str]:  # noqa: F811
    """Every resource the page asked for, as the browser's resource timing lists it."""
    return browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        ("/api/v1/docs/", ".opblock-summary-path"),
        # Redoc renders each operation's path in its right-hand panel.
        ("/api/v1/redoc/", "[data-section-id^='tag/']"),
    ],
)
def test_the_docs_page_renders_the_local_schema_without_a_cdn(
    live_server, browser, path, rendered  # noqa: F811
):
    log_in(browser, live_server, path)

    WebDriverWait(browser, 20).until(
        EC.presence_of_all_elements_located((By.CSS_SELECTOR, rendered))
    )
    assert browser.current_url == f"{live_server.url}{path}"
    assert "/api/v1/usage-events/" in browser.page_source
    urls = fetched_urls(browser)
    assert any(u.startswith(f"{live_server.url}/api/v1/schema/") for u in urls), urls
    outside = {u for u in urls if not u.startswith(live_server.url) and not u.startswith("data:")}
    # Chromium lists a request the page's Content-Security-Policy blocked, too: each one
    # outside the application must have been blocked, never sent.
    blocked = {
        url
        for entry in browser.get_log("browser")
        if entry["source"] == "security" and "has been blocked" in entry["message"]
        for url in outside
        if f"'{url}'" in entry["message"]
    }
    assert outside == blocked, outside - blocked
