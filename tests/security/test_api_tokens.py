"""API tokens: created and revoked in the console and with `manage.py api_token`; shown
once in full; a revoked token gets 401 at once; every change is in the activity log."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import UserFactory
from usage_sync.models import SyncActivity

pytestmark = pytest.mark.django_db

PAGE = reverse("console:tokens")
CREATE = reverse("console:tokens-create")
REVOKE = reverse("console:tokens-revoke")


def api_status(key: str) -> int:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client.get("/api/v1/batches/").status_code


def test_the_console_nav_links_the_tokens_page(viewer_client):
    assert f'href="{PAGE}"' in viewer_client.get(reverse("console:overview")).content.decode()


def test_a_user_creates_a_token_that_is_shown_once_then_only_by_prefix(viewer_client, viewer):
    assert "You have no API token" in viewer_client.get(PAGE).content.decode()

    created = viewer_client.post(CREATE)

    key = Token.objects.get(user=viewer).key
    assert created.status_code == 200
    assert key in created.content.decode()
    assert "no-store" in created["Cache-Control"]
    later = viewer_client.get(PAGE).content.decode()
    assert key not in later
    assert key[:6] + "…" in later
    assert api_status(key) == 200


def test_a_revoked_token_gets_401_at_once(viewer_client, viewer):
    viewer_client.post(CREATE)
    key = Token.objects.get(user=viewer).key
    assert api_status(key) == 200

    response = viewer_client.post(REVOKE, follow=True)

    assert "revoked" in response.content.decode()
    assert not Token.objects.filter(user=viewer).exists()
    assert api_status(key) == 401
    assert "You have no API token" in viewer_client.get(PAGE).content.decode()


def test_replacing_a_token_revokes_the_old_one(viewer_client, viewer):
    viewer_client.post(CREATE)
    old = Token.objects.get(user=viewer).key

    viewer_client.post(CREATE)

    new = Token.objects.get(user=viewer).key
    assert new != old
    assert (api_status(old), api_status(new)) == (401, 200)


def test_a_user_revokes_only_their_own_token(viewer_client):
    other = UserFactory()
    other_key = Token.objects.create(user=other).key

    viewer_client.post(REVOKE)

    assert api_status(other_key) == 200


def test_token_changes_are_in_the_activity_log_without_the_key(viewer_client, viewer):
    viewer_client.post(CREATE)
    key = Token.objects.get(user=viewer).key
    viewer_client.post(REVOKE)

    entries = list(SyncActivity.objects.filter(action_name__startswith="API_TOKEN")
                   .order_by("id").values_list("action_name", "actor", "details"))
    assert [(a, actor) for a, actor, _ in entries] == [
        ("API_TOKEN_CREATE", viewer.username), ("API_TOKEN_REVOKE", viewer.username)
    ]
    assert entries[1][2] == {"prefix": key[:6] + "…"}
    assert all(key not in str(details) for _, _, details in entries)


def test_the_token_pages_do_not_change_anything_on_get(viewer_client, viewer):
    assert viewer_client.get(CREATE).status_code == 302
    assert viewer_client.get(REVOKE).status_code == 302
    assert not Token.objects.filter(user=viewer).exists()


def test_anonymous_visitors_cannot_create_a_token():
    response = Client().post(CREATE)

    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert not Token.objects.exists()


# --- manage.py api_token ------------------------------------------------------------------


def test_the_command_creates_a_token_and_prints_only_the_key(viewer):
    out, err = io.StringIO(), io.StringIO()

    call_command("api_token", "create", viewer.username, stdout=out, stderr=err)

    key = Token.objects.get(user=viewer).key
    assert out.getvalue().strip() == key
    assert "not shown again" in err.getvalue()
    assert api_status(key) == 200
    entry = SyncActivity.objects.get(action_name="API_TOKEN_CREATE")
    assert entry.actor.startswith("cli:")


def test_the_command_revokes_a_token(viewer):
    key = Token.objects.create(user=viewer).key
    out = io.StringIO()

    call_command("api_token", "revoke", viewer.username, "--actor", "ops-oncall", stdout=out)

    assert f"Revoked the API token {key[:6]}…" in out.getvalue()
    assert key not in out.getvalue()
    assert api_status(key) == 401
    assert SyncActivity.objects.get(action_name="API_TOKEN_REVOKE").actor == "ops-oncall"


def test_the_command_names_what_is_wrong(viewer):
    with pytest.raises(CommandError, match="No user 'nobody'"):
        call_command("api_token", "create", "nobody")
    with pytest.raises(CommandError, match="has no API token"):
        call_command("api_token", "revoke", viewer.username)


def test_the_admin_lists_tokens_by_prefix_only(admin_client):
    key = Token.objects.create(user=UserFactory()).key

    page = admin_client.get("/admin/authtoken/tokenproxy/").content.decode()

    assert key[:6] + "…" in page
    assert key not in page
