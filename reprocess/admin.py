from django.contrib import admin

from .models import ReprocessRun


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
