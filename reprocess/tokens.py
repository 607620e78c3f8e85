"""API tokens: each user creates and revokes their own, in the console or with
`manage.py api_token`.

A token is DRF's `Token` (one per user, sent as `Authorization: Token <key>`). Its key is
shown once, when it is created; afterwards only its first characters, enough to tell
which one a client holds. Revoking deletes the row, so the next request with it gets 401.
Both are written to the activity log, with the prefix only.
"""

from django.contrib import messages
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.cache import never_cache
from rest_framework.authtoken.models import Token

from usage_sync.models import SyncActivity

from .console import ConsoleMixin

PREFIX_LENGTH = 6


def token_prefix(key: str) -> str:
    """Return the part of a key that may be shown again: enough to recognize it, useless
    to authenticate with."""
    return key[:PREFIX_LENGTH] + "…"


def api_token_create(*, user: AbstractBaseUser, actor: str) -> Token:
    """Give the user a new token, replacing (and so revoking) the one they had."""
    with transaction.atomic():
        # The key is the primary key: read it before delete() clears it.
        replaced = Token.objects.filter(user=user).values_list("key", flat=True).first()
        Token.objects.filter(user=user).delete()
        token = Token.objects.create(user=user)
        _log(user=user, actor=actor, action=SyncActivity.Action.API_TOKEN_CREATE, details={
            "prefix": token_prefix(token.key),
            "replaced": token_prefix(replaced) if replaced else None,
        })
    return token


def api_token_revoke(*, user: AbstractBaseUser, actor: str) -> str | None:
    """Delete the user's token; return its prefix, or None when they had none."""
    with transaction.atomic():
        key = Token.objects.select_for_update().filter(user=user).values_list(
            "key", flat=True
        ).first()
        if key is None:
            return None
        Token.objects.filter(key=key).delete()
        prefix = token_prefix(key)
        _log(user=user, actor=actor, action=SyncActivity.Action.API_TOKEN_REVOKE,
             details={"prefix": prefix})
    return prefix


def _log(*, user, actor: str, action: str, details: dict) -> None:
    SyncActivity.objects.create(
        action_name=action,
        object_name=f"API token of {user.get_username()}"[:100],
        status=SyncActivity.Status.COMPLETE,
        actor=actor,
        details=details,
    )


# --- console -----------------------------------------------------------------------------


@method_decorator(never_cache, name="dispatch")
class TokenView(ConsoleMixin, View):
    """API tokens: the user's token by its prefix, with Create / Replace and Revoke."""

    def get(self, request):
        return self.page(request, new_key=None)

    def page(self, request, *, new_key: str | None):
        token = Token.objects.filter(user=request.user).first()
        return render(request, "reprocess/tokens.html", {
            "section": "usage",
            "nav": "tokens",
            "token": token,
            "prefix": token_prefix(token.key) if token else "",
            "new_key": new_key,
        })


class TokenCreateView(TokenView):
    """Create (or replace) the user's token and show its key, this once."""

    def get(self, request):
        return redirect("console:tokens")

    def post(self, request):
        token = api_token_create(user=request.user, actor=request.user.get_username())
        # Rendered, not redirected: the key is in this response only (and never cached).
        return self.page(request, new_key=token.key)


class TokenRevokeView(TokenView):
    """Revoke the user's token: the next request made with it gets 401."""

    def get(self, request):
        return redirect("console:tokens")

    def post(self, request):
        prefix = api_token_revoke(user=request.user, actor=request.user.get_username())
        if prefix:
            messages.success(request, f"Token {prefix} revoked: it no longer authenticates.")
        else:
            messages.info(request, "You had no API token.")
        return redirect("console:tokens")
