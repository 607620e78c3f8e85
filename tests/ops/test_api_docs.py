"""The API documentation pages: Swagger UI and Redoc from vendored static files, login
required."""

import re

import pytest
from django.contrib.staticfiles import finders
from django.templatetags.static import static
from django.test import Client

pytestmark = pytest.mark.django_db

PAGES = ["/api/v1/docs/", "/api/v1/redoc/"]
# The files a page loads: its src="…" and href="…" attributes.
URL_ATTRIBUTE = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.fixture
def operator(client, user) -> Client:
    client.force_login(user)
    return client


@pytest.mark.parametrize("page", PAGES)
def test_an_anonymous_visitor_is_sent_to_the_login_page(client, page):
    response = client.get(page)

    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={page}"


@pytest.mark.parametrize("page", PAGES)
def test_the_page_renders_for_an_operator_and_loads_only_local_files(operator, page):
    response = operator.get(page)

    assert response.status_code == 200
    html = response.content.decode()
    assert "https://" not in html and "http://" not in html
    urls = URL_ATTRIBUTE.findall(html)
    assert urls, html
    for url in urls:
        assert not url.startswith("//"), url
        assert url.startswith("/"), url


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/api/v1/docs/", ["swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                           "swagger-ui.css", "favicon-32x32.png"]),
        ("/api/v1/redoc/", ["redoc.standalone.js"]),
    ],
)
def test_every_static_file_the_page_names_exists(operator, page, expected):
    html = operator.get(page).content.decode()
    prefix = static("")
    static_urls = [u for u in URL_ATTRIBUTE.findall(html) if u.startswith(prefix)]

    for name in expected:
        assert any(u.endswith(name) for u in static_urls), (name, static_urls)
    for url in static_urls:
        path = url.removeprefix(prefix).split("?")[0]
        assert finders.find(path), f"{url} is not a static file of the project"


def test_swagger_ui_loads_the_local_schema_without_the_validator_badge(operator):
    html = operator.get("/api/v1/docs/").content.decode()

    assert 'url: "/api/v1/schema/"' in html
    # The badge would send the schema to validator.swagger.io.
    assert '"validatorUrl": null' in html


def test_redoc_loads_the_local_schema(operator):
    html = operator.get("/api/v1/redoc/").content.decode()

    assert "/api/v1/schema/" in html
    assert "fonts.googleapis.com" not in html


def test_the_schema_needs_a_login_as_the_rest_of_the_api(client, operator):
    anonymous = Client()
    assert anonymous.get("/api/v1/schema/").status_code in (401, 403)
    assert operator.get("/api/v1/schema/").status_code == 200


def test_the_console_links_to_the_api_documentation(operator):
    html = operator.get("/").content.decode()

    assert 'href="/api/v1/docs/"' in html
