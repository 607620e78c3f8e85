"""Top-level URLs: admin, the REST API under /api/v1/, the OpenAPI schema."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("usage_sync.urls")),
    path("api/v1/", include("reprocess.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
]
