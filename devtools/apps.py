from django.apps import AppConfig


class DevtoolsConfig(AppConfig):
    """Development tooling: the core Aria simulator, benchmarks, soak, demo data, the dev
    stack. Installed in a checkout, never in the production image."""

    name = "devtools"
    verbose_name = "Development tooling"
