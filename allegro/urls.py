"""Top-level URLs: admin, metrics and health, the REST API under /api/v1/, the OpenAPI
schema and its documentation pages, the console."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.urls import include, path
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerView,
)

from allegro import health
from allegro.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    # Operations: Prometheus scrapes /metrics; orchestrators probe /healthz/*.
    path("metrics", metrics_view, name="metrics"),
    path("healthz/live", health.live, name="healthz-live"),
    path("healthz/ready", health.ready, name="healthz-ready"),
    path("api/v1/", include("usage_sync.urls")),
    path("api/v1/", include("reprocess.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # API documentation from vendored static files; a browser without a session goes to
    # the login page (the API itself answers 401).
    path(
        "api/v1/docs/",
        login_required(SpectacularSwaggerView.as_view(url_name="api-schema")),
        name="api-docs",
    ),
    path(
        "api/v1/redoc/",
        login_required(
            SpectacularRedocView.as_view(url_name="api-schema", template_name="api_docs/redoc.html")
        ),
        name="api-redoc",
    ),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("reprocess.console_urls")),
]
