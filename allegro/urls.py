"""Top-level URLs: admin, metrics and health, the REST API under /api/v1/, the OpenAPI
schema, the console."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from allegro import health
from usage_sync.exporter import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    # Operations: Prometheus scrapes /metrics; orchestrators probe /healthz/*.
    path("metrics", metrics_view, name="metrics"),
    path("healthz/live", health.live, name="healthz-live"),
    path("healthz/ready", health.ready, name="healthz-ready"),
    path("api/v1/", include("usage_sync.urls")),
    path("api/v1/", include("reprocess.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("reprocess.console_urls")),
]
