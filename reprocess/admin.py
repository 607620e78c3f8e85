from django.contrib import admin
from rest_framework.authtoken.admin import TokenAdmin
from rest_framework.authtoken.models import TokenProxy

from .models import ReprocessRun
from .tokens import token_prefix


@admin.register(ReprocessRun)
class ReprocessRunAdmin(admin.ModelAdmin):
    """Read-only: runs are created by the console, the API and `manage.py reprocess`."""

    list_display = ["id", "level", "batch", "error_code", "status", "actor", "records_selected",
                    "batches_selected", "created_at", "finished_at"]
    list_filter = ["level"]
    search_fields = ["actor", "reason"]
    raw_id_fields = ["batch"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


# DRF lists every token's full key; the console shows a key once, so the admin shows
# only its prefix (enough to tell tokens apart, useless to authenticate with).
admin.site.unregister(TokenProxy)


@admin.register(TokenProxy)
class ApiTokenAdmin(TokenAdmin):
    list_display = ["key_prefix", "user", "created"]

    @admin.display(description="key")
    def key_prefix(self, obj):
        return token_prefix(obj.key)
