"""Every URL the project serves, enumerated from the URLconf and classified by who may use
it, so a new endpoint is tested (or makes a test fail) without anyone remembering to."""

import dataclasses
import re

from django.urls import URLPattern, URLResolver, get_resolver

# Served to anyone, on purpose. Everything else needs a login or a token.
PUBLIC = {
    "login/": "the login page",
    "logout/": "logging out needs no login",
    "metrics": "Prometheus scrape; METRICS_TOKEN guards it when set",
    "healthz/live": "liveness probe, no data",
    "healthz/ready": "readiness probe, no data",
}
# HTML pages under /api/v1/ that a browser opens: a login redirect, like the console.
API_PAGES = {"api/v1/docs/", "api/v1/redoc/"}
# Any logged-in user (or token) may use these POST endpoints without the reprocess
# permission: ingest, one's own preferences and one's own API token.
POST_WITHOUT_REPROCESS_PERMISSION = {
    "api/v1/usage-events/": "ingest",
    "preferences/": "one's own time zone",
    "tokens/create/": "one's own token",
    "tokens/revoke/": "one's own token",
}
# Console POST views that need a permission the plain viewer lacks.
POST_NEEDS_PERMISSION = {
    "usage/reprocess/": "reprocess.reprocess_usage",
    "usage/configuration/": "usage_sync.change_aggregationconfig",
}

_CONVERTER = re.compile(r"<(?:(\w+):)?(\w+)>")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    route: str  # as written in the URLconf, without the leading slash
    namespace: str | None
    name: str | None
    view: object

    @property
    def is_api(self) -> bool:
        return self.route.startswith("api/v1/") and self.route not in API_PAGES

    @property
    def is_console_page(self) -> bool:
        return self.namespace == "console" or self.route in API_PAGES

    @property
    def accepts_post(self) -> bool:
        cls = getattr(self.view, "view_class", None) or getattr(self.view, "cls", None)
        return cls is not None and hasattr(cls, "post")

    def url(self, **ids: int) -> str:
        """Return the path with each <converter:name> filled from `ids`."""

        def fill(match):
            converter, name = match.groups()
            if converter in (None, "str", "slug", "path"):
                return str(ids.get(name, "x"))
            return str(ids[name])

        return "/" + _CONVERTER.sub(fill, self.route)


def endpoints() -> list[Endpoint]:
    """Return every URL pattern outside the admin (which guards itself, tested apart)."""
    found = []

    def walk(patterns, prefix: str, namespace: str | None):
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                if route == "admin/":
                    continue
                walk(pattern.url_patterns, route, pattern.namespace or namespace)
            elif isinstance(pattern, URLPattern):
                found.append(Endpoint(route, namespace, pattern.name, pattern.callback))

    walk(get_resolver().url_patterns, "", None)
    return found
