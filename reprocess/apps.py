from django.apps import AppConfig


class ReprocessConfig(AppConfig):
    """Review and reprocessing of aggregated usage sync: the operator console's app."""

    name = "reprocess"
    verbose_name = "Billing sync reprocess"
