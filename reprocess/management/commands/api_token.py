"""manage.py api_token create|revoke USERNAME: an operator's API token, from a shell."""

import getpass

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from reprocess.tokens import api_token_create, api_token_revoke


class Command(BaseCommand):
    help = (
        "Create (or replace) a user's REST API token and print it once, or revoke it. "
        "The console page 'API tokens' does the same for the logged-in user."
    )

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["create", "revoke"])
        parser.add_argument("username")
        parser.add_argument("--actor", default=f"cli:{getpass.getuser()}",
                            help="Who, for the activity log (default: cli:<os user>).")

    def handle(self, *args, action, username, actor, **options):
        users = get_user_model()
        try:
            user = users.objects.get_by_natural_key(username)
        except users.DoesNotExist:
            raise CommandError(f"No user {username!r}.") from None
        if action == "create":
            token = api_token_create(user=user, actor=actor)
            # The key alone on stdout, so `$(manage.py api_token create ops)` captures it.
            self.stdout.write(token.key)
            self.stderr.write(
                f"Created the API token of {username}; any previous one is revoked. "
                "It is not shown again."
            )
            return
        prefix = api_token_revoke(user=user, actor=actor)
        if prefix is None:
            raise CommandError(f"{username} has no API token.")
        self.stdout.write(f"Revoked the API token {prefix} of {username}.")
