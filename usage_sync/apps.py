from django.apps import AppConfig


class UsageSyncConfig(AppConfig):
    name = "usage_sync"
    verbose_name = "Usage sync"
