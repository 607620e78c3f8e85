"""The console as production serves it: plain gunicorn, DEBUG off, no proxy in front. The
application serves its own static files (WhiteNoise), so pages are styled and scripted."""

import os
import subprocess
import sys

import pytest
import requests
from django.db import connection
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from devtools.processes import ChildProcess
from tests.factories import UserFactory, grant_reprocess, make_batch
from tests.services import ROOT, free_port, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


@pytest.fixture
def production_server(tmp_path):
    """gunicorn on the test database with production settings and collected static files."""
    db = connection.settings_dict
    static_root = tmp_path / "static"
    env = {
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "DEBUG": "false",
        "SECRET_KEY": "browser-test-production-secret-key-0123456789",
        "ALLOWED_HOSTS": "127.0.0.1",
        "STATIC_ROOT": str(static_root),
        # Plain HTTP on the loopback: the HTTPS-only defaults are the TLS proxy's business.
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
        "SECURE_HSTS_SECONDS": "0",
    }
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
                   cwd=ROOT, env={**os.environ, **env}, check=True)
    port = free_port()
    server = ChildProcess(
        [sys.executable, "-m", "gunicorn", "--config=python:allegro.gunicorn_conf",
         "allegro.wsgi:application", f"--bind=127.0.0.1:{port}", "--workers=2"],
        env=env, log=tmp_path / "gunicorn.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{base}/healthz/live", timeout=1).ok, timeout=30,
                 what="gunicorn")
        yield base
    finally:
        server.stop()


def test_the_console_is_styled_and_expands_a_batch_under_gunicorn_with_debug_off(
    production_server, browser, shoot
):
    user = UserFactory(username="prod-ops")
    grant_reprocess(user)
    batch = make_batch(complete=2, errors={"1009": 3})

    browser.get(production_server + "/usage/aggregated/")
    WebDriverWait(browser, 10).until(EC.presence_of_element_located((By.ID, "id_username")))
    browser.find_element(By.ID, "id_username").send_keys("prod-ops")
    browser.find_element(By.ID, "id_password").send_keys("correct horse battery")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 10).until(EC.title_contains("Aggregated usage"))

    # Styled: the stylesheet (content-hashed, compressed, cached for a year) was applied.
    topbar = browser.find_element(By.CSS_SELECTOR, ".topbar")
    assert topbar.value_of_css_property("background-color") == "rgba(15, 23, 42, 1)"
    stylesheet = browser.find_element(By.CSS_SELECTOR, "link[rel=stylesheet]")
    href = stylesheet.get_attribute("href")
    assert "/static/reprocess/console." in href and href.endswith(".css")
    served = requests.get(href, headers={"Accept-Encoding": "gzip"}, timeout=5)
    assert served.headers["Content-Encoding"] == "gzip"
    assert "max-age=315360000" in served.headers["Cache-Control"]

    # Scripted: the expand icon opens the batch's summary in place.
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-batch-id='{batch.pk}']")
    row.find_element(By.CSS_SELECTOR, ".js-expand").click()
    line = WebDriverWait(browser, 10).until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, "tr.summary-row table.table-inner > tbody > tr")))
    assert "1009" in line.text
    assert browser.current_url.endswith("/usage/aggregated/")
    shoot("11-production-server")

    # The admin's and the API docs' own assets are served too.
    for page, asset in (("/admin/", "admin/css/base"), ("/api/v1/docs/", "swagger-ui")):
        browser.get(production_server + page)
        urls = browser.execute_script(
            "return Array.from(document.querySelectorAll('link[href], script[src]'))"
            ".map(e => e.href || e.src)")
        assert any(asset in url for url in urls), (page, urls)
        for url in urls:
            if "/static/" in url:
                assert requests.get(url, timeout=5).status_code == 200, url
