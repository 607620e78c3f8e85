from django.contrib import admin
from django.utils import timezone

from .models import AggregatedBatch, AggregationConfig, SyncActivity, UsageEvent, UsageRecord


@admin.register(AggregationConfig)
class AggregationConfigAdmin(admin.ModelAdmin):
    list_display = ["__str__", "frequency_minutes", "batch_size", "lateness_grace_minutes",
                    "enabled", "last_run_at"]
    readonly_fields = ["last_run_at", "updated_at", "rule_changes_at", "previous_rule"]

    def save_model(self, request, obj, form, change):
        # As the console does: a new frequency or grouping applies from the next window on.
        now = timezone.now()
        stored = AggregationConfig.objects.filter(pk=obj.pk).first()
        if stored:
            obj.edited(in_force=stored.rule_at(now), now=now)
        super().save_model(request, obj, form, change)

    def has_add_permission(self, request):
        return not AggregationConfig.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AggregatedBatch)
class AggregatedBatchAdmin(admin.ModelAdmin):
    list_display = ["id", "window_start", "window_end", "sequence", "status", "total_count",
                    "completed_count", "error_count", "pending_count", "ignored_count"]
    list_filter = ["status"]
    date_hierarchy = "window_start"

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ["client_record_id", "batch", "client_acct_id", "acct_no", "usage_type_code",
                    "usage_units", "amount", "status", "sync_error_code"]
    list_filter = ["status"]
    search_fields = ["client_record_id", "client_acct_id"]
    raw_id_fields = ["batch"]

    # Records are never edited to reprocess them: what was sent stays auditable.
    def has_change_permission(self, request, obj=None):
        return False


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = ["event_id", "client_acct_id", "acct_no", "usage_type_code", "usage_units",
                    "usage_date", "record"]
    search_fields = ["event_id", "client_acct_id"]
    raw_id_fields = ["record"]

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(SyncActivity)
class SyncActivityAdmin(admin.ModelAdmin):
    list_display = ["id", "created_at", "action_name", "object_name", "status", "record_count",
                    "duration_ms", "actor"]
    list_filter = ["status", "action_name"]

    def has_change_permission(self, request, obj=None):
        return False
