"""Who may do what, over every URL the URLconf serves (tests/security/endpoints.py enumerates
them): anonymous visitors, logged-in users without the reprocess permission, and CSRF."""

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from reprocess.models import ReprocessRun
from tests.factories import UsageEventFactory, UserFactory, make_batch
from tests.security.endpoints import (
    POST_NEEDS_PERMISSION,
    POST_WITHOUT_REPROCESS_PERMISSION,
    PUBLIC,
    endpoints,
)
from usage_sync.models import AggregationConfig, RecordStatus, UsageRecord

pytestmark = pytest.mark.django_db

ENDPOINTS = endpoints()
CONSOLE = [e for e in ENDPOINTS if e.is_console_page]
API = [e for e in ENDPOINTS if e.is_api]
CONSOLE_POSTS = [e for e in CONSOLE if e.accepts_post]
API_POSTS = [e for e in API if e.accepts_post]
LOGIN = reverse("login")


@pytest.fixture
def ids(published):
    """Real objects behind every <int:…> of a URL, so no check hides behind a 404."""
    batch = make_batch(complete=1, errors={"1009": 2}, pending=1)
    run = ReprocessRun.objects.create(level="BATCH", batch=batch, actor="someone")
    record = batch.records.first()
    event = UsageEventFactory(record=record, client_acct_id=record.client_acct_id)
    return {"batch_id": batch.id, "run_id": run.id, "record_id": record.id,
            "event_id": event.event_id}


def test_every_url_is_public_console_or_api():
    unclassified = [e.route for e in ENDPOINTS
                    if e.route not in PUBLIC and not e.is_console_page and not e.is_api]
    assert unclassified == []
    # The enumeration sees the endpoints it must (guards against it finding nothing).
    routes = {e.route for e in ENDPOINTS}
    assert {"", "usage/reprocess/", "tokens/create/", "api/v1/usage-events/",
            "api/v1/reprocess/all/", "api/v1/schema/"} <= routes
    assert len(CONSOLE_POSTS) >= 4 and len(API_POSTS) >= 4


# --- anonymous ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("endpoint", CONSOLE, ids=lambda e: e.route or "/")
def test_anonymous_visitors_are_sent_to_the_login_page(ids, endpoint, method):
    url = endpoint.url(**ids)

    response = getattr(Client(), method)(url)

    assert response.status_code == 302, url
    assert response["Location"].startswith(f"{LOGIN}?next="), url


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
@pytest.mark.parametrize("endpoint", API, ids=lambda e: e.route)
def test_anonymous_api_callers_get_401(ids, endpoint, method):
    url = endpoint.url(**ids)

    response = getattr(Client(), method)(url)

    assert response.status_code == 401, url
    assert response["WWW-Authenticate"] == 'Token'
    # JSON, or the schema's own YAML for /api/v1/schema/.
    assert b"credentials were not provided" in response.content


@pytest.mark.parametrize("endpoint", API, ids=lambda e: e.route)
def test_a_bad_or_revoked_token_gets_401(ids, endpoint):
    response = Client().get(endpoint.url(**ids), HTTP_AUTHORIZATION="Token " + "0" * 40)

    assert response.status_code == 401


def test_nothing_changed_after_the_anonymous_posts(ids):
    for endpoint in CONSOLE_POSTS + API_POSTS:
        Client().post(endpoint.url(**ids), {"level": "ALL"})

    assert ReprocessRun.objects.count() == 1
    assert UsageRecord.objects.filter(status=RecordStatus.ERROR).count() == 2


def test_the_admin_sends_anonymous_visitors_to_its_login():
    response = Client().get("/admin/")

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


# --- logged in without the reprocess permission --------------------------------------------


def reprocess_posts(endpoints_):
    return [e for e in endpoints_ if e.route not in POST_WITHOUT_REPROCESS_PERMISSION]


def test_every_post_endpoint_is_classified():
    posts = {e.route for e in CONSOLE_POSTS + API_POSTS}
    known = set(POST_WITHOUT_REPROCESS_PERMISSION) | set(POST_NEEDS_PERMISSION)
    api_reprocess = {e.route for e in API_POSTS if "reprocess" in e.route}
    assert posts - known == api_reprocess, "classify the new POST endpoint in endpoints.py"


@pytest.mark.parametrize("endpoint", reprocess_posts(API_POSTS), ids=lambda e: e.route)
def test_the_api_refuses_reprocess_without_the_permission(ids, viewer_api, endpoint):
    response = viewer_api.post(endpoint.url(**ids), {"status": "ERROR", "error_code": "1009"},
                               format="json")

    assert response.status_code == 403
    assert "reprocess.reprocess_usage" in response.json()["detail"]
    assert ReprocessRun.objects.count() == 1
    assert UsageRecord.objects.filter(status=RecordStatus.ERROR).count() == 2


@pytest.mark.parametrize("endpoint", reprocess_posts(CONSOLE_POSTS), ids=lambda e: e.route)
def test_the_console_refuses_permissioned_posts_without_the_permission(
    ids, viewer_client, endpoint
):
    before = AggregationConfig.load().batch_size

    response = viewer_client.post(
        endpoint.url(**ids),
        {"level": "ALL", "frequency_minutes": 60, "batch_size": 7, "lateness_grace_minutes": 5},
    )

    assert response.status_code == 403
    assert ReprocessRun.objects.count() == 1
    assert UsageRecord.objects.filter(status=RecordStatus.ERROR).count() == 2
    assert AggregationConfig.load().batch_size == before


def test_the_reprocess_confirmation_page_is_refused_without_the_permission(ids, viewer_client):
    response = viewer_client.get(reverse("console:reprocess") + "?level=ALL")

    assert response.status_code == 403


def text(response) -> str:
    if response.streaming:
        return b"".join(response.streaming_content).decode()
    return response.content.decode()


# Pages that show something only with a query: what it needs.
PAGE_QUERIES = {"usage/aggregated/<int:batch_id>/summary/": "fragment=1",
                "usage/events/": "id={event_id}", "search/": "q={event_id}"}


def console_pages(ids):
    """Every console GET page, with a batch expanded, a run, an event and a search."""
    pages = []
    for e in CONSOLE:
        if e.route == "usage/reprocess/" or e.route.startswith("tokens/") and e.route != "tokens/":
            continue
        query = PAGE_QUERIES.get(e.route, "").format(**ids)
        pages.append(e.url(**ids) + (f"?{query}" if query else ""))
    return pages


def test_users_without_the_permission_see_no_reprocess_button(ids, viewer_client,
                                                              operator_client):
    # A Reprocess button is a link to the confirmation page with its scope.
    reprocess_path = 'href="' + reverse("console:reprocess") + "?"
    pages = console_pages(ids) + [reverse("console:batches") + f"?run={ids['run_id']}"]
    shown_to_operator = []
    for url in pages:
        viewer_page = viewer_client.get(url, follow=True)
        assert viewer_page.status_code == 200, url
        assert reprocess_path not in text(viewer_page), url
        if reprocess_path in text(operator_client.get(url, follow=True)):
            shown_to_operator.append(url)
    # The same pages do show the buttons to an operator: the check above means something.
    assert reverse("console:batches") in shown_to_operator
    assert reverse("console:batch", args=[ids["batch_id"]]) in shown_to_operator


# --- CSRF --------------------------------------------------------------------------------


@pytest.fixture
def csrf_client(db):
    """A superuser's browser session whose POSTs Django checks for the CSRF token."""
    user = UserFactory(is_superuser=True, is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="reprocess_usage"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get(reverse("console:overview"))  # sets the csrftoken cookie
    return client


@pytest.mark.parametrize("endpoint", CONSOLE_POSTS, ids=lambda e: e.route)
def test_every_console_post_needs_the_csrf_token(ids, csrf_client, endpoint):
    url = endpoint.url(**ids)
    data = {"level": "BATCH", "batch": ids["batch_id"], "frequency_minutes": 60,
            "batch_size": 500, "lateness_grace_minutes": 5, "time_zone": "UTC"}

    refused = csrf_client.post(url, data)
    accepted = csrf_client.post(
        url, {**data, "csrfmiddlewaretoken": csrf_client.cookies["csrftoken"].value}
    )

    assert refused.status_code == 403 and b"CSRF" in refused.content, url
    assert accepted.status_code in (200, 302), url


@pytest.mark.parametrize("endpoint", API_POSTS, ids=lambda e: e.route)
def test_api_posts_with_a_session_need_the_csrf_token(ids, csrf_client, endpoint):
    response = csrf_client.post(endpoint.url(**ids), {"dry_run": True},
                                content_type="application/json")

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


def test_logging_out_needs_the_csrf_token(csrf_client):
    assert csrf_client.post(reverse("logout")).status_code == 403
    assert csrf_client.get(reverse("console:overview")).status_code == 200


def test_logging_in_needs_the_csrf_token(db):
    user = UserFactory()
    client = Client(enforce_csrf_checks=True)

    refused = client.post(LOGIN, {"username": user.username, "password": "correct horse battery"})
    client.get(LOGIN)
    accepted = client.post(LOGIN, {"username": user.username,
                                   "password": "correct horse battery",
                                   "csrfmiddlewaretoken": client.cookies["csrftoken"].value})

    assert refused.status_code == 403
    assert accepted.status_code == 302 and accepted["Location"] == reverse("console:overview")
