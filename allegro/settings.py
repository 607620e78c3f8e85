"""Settings for Allegro Usage Sync, read from the environment (README, Configuration).

Every value has a default that lets a fresh checkout run (`make run`); production sets
them in the environment. A malformed value fails loudly at start.
"""

import importlib.util
import warnings
from pathlib import Path

import environ

from allegro.logging import default_log_format, logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env.str("SECRET_KEY", default="dev-only-insecure-secret-key-change-me")
if not DEBUG and SECRET_KEY.startswith("dev-only"):
    raise environ.ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

# Production security: with DEBUG off, HTTPS only (redirect, secure cookies, HSTS).
# `manage.py check --deploy --fail-level WARNING` passes with these defaults
# (tests/security/test_production_settings.py). Each one can be turned off by env.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
# Probes and scrapers speak plain HTTP inside the private network.
SECURE_REDIRECT_EXEMPT = [r"^healthz/", r"^metrics$"]
# Behind a TLS-terminating proxy: the header it sets to "https", e.g. X-Forwarded-Proto.
# Only set it when the proxy always overwrites that header (otherwise clients can forge it).
_ssl_header = env.str("SECURE_PROXY_SSL_HEADER", default="")
if _ssl_header:
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _ssl_header.upper().replace("-", "_"), "https")
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "django_tables2",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "usage_sync",
    "reprocess",
]
# Development tooling (the simulator, benchmarks, soak, demo data): in a checkout, not in
# the production image.
if importlib.util.find_spec("devtools"):
    INSTALLED_APPS.append("devtools")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from the application itself (no proxy needed), before anything that
    # would spend work on them.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # The console's times in the zone the user chose (UTC until they choose).
    "reprocess.preferences.UserTimeZoneMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "allegro.urls"
WSGI_APPLICATION = "allegro.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL everywhere. Unset, the machine's own server; `make run` and `make test` set it
# to an embedded PostgreSQL when none answers there (devtools/services.py).
DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/postgres")
}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise environ.ImproperlyConfigured("DATABASE_URL must name a PostgreSQL database")
# Keep connections between requests and consumer messages; check them before reuse.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "console:overview"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where `collectstatic` puts the console's, the admin's and the API docs' files (the image
# does at build); WhiteNoise serves them compressed, with content-hashed names cached
# forever.
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "var" / "static")
# With DEBUG on (development, and the test suite's settings) nothing is collected: files
# are found in the apps as they are, under their own names.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
if DEBUG:
    # WhiteNoise warns that STATIC_ROOT does not exist; in development nothing is collected
    # there on purpose (the files come from the apps), so the warning is only noise.
    warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")

# Ingest accepts lists of up to 10,000 events; a JSON body of that size is a few MB.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=8 * 1024 * 1024)

REST_FRAMEWORK = {
    # Token first: an anonymous API caller then gets 401 with a WWW-Authenticate header.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Bad input answers in JSON (413 over the size limit, 400 for absurd nesting), not 500.
    "DEFAULT_PARSER_CLASSES": [
        "allegro.rest.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "EXCEPTION_HANDLER": "allegro.rest.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Allegro Usage Sync API",
    "DESCRIPTION": "Ingest raw usage; review and reprocess aggregated usage record sync.",
    "VERSION": "1",
    # Several models have a "status" field; name each enum after its model's status type.
    "ENUM_NAME_OVERRIDES": {
        "BatchStatusEnum": "usage_sync.models.BatchStatus",
        "RecordStatusEnum": "usage_sync.models.RecordStatus",
        "ActivityStatusEnum": "usage_sync.models.SyncActivity.Status",
        "ActivityActionEnum": "usage_sync.models.SyncActivity.Action",
    },
    # The schema and its docs pages need a login, like every other API endpoint.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Swagger UI and Redoc from the vendored static files of drf-spectacular-sidecar: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No validator badge: it would send the schema to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}

# Celery (Redis broker). Beat runs aggregation; its period follows the database
# configuration, so beat ticks every minute and the task decides whether a run is due.
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
# Where tasks are sent; workers take it unless started with --queues.
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_TASK_DEFAULT_QUEUE", default="celery")
CELERY_BEAT_SCHEDULE = {
    "aggregate-usage": {"task": "usage_sync.tasks.aggregate_usage_if_due", "schedule": 60.0},
    # The sweep publishes what was never published, was lost, or is due for a retry.
    "publish-due-batches": {
        "task": "usage_sync.tasks.publish_due_batches",
        "schedule": env.float("SYNC_SWEEP_INTERVAL_SECONDS", default=15.0),
    },
}

# Kafka transport and core Aria (used by the sync service).
KAFKA_BOOTSTRAP_SERVERS = env.str("KAFKA_BOOTSTRAP_SERVERS", default="127.0.0.1:9092")
KAFKA_AGGREGATED_TOPIC = env.str("KAFKA_AGGREGATED_TOPIC", default="allegro.aggregated-usage")
KAFKA_AGGREGATED_TOPIC_PARTITIONS = env.int("KAFKA_AGGREGATED_TOPIC_PARTITIONS", default=6)
KAFKA_CONSUMER_GROUP = env.str("KAFKA_CONSUMER_GROUP", default="allegro-usage-sync")
# How soon the group notices a consumer that died (Kafka's minimum is usually 6 s).
KAFKA_SESSION_TIMEOUT_MS = env.int("KAFKA_SESSION_TIMEOUT_MS", default=45_000)
# How the group shares partitions: cooperative-sticky moves only the partitions that must
# move when a worker comes or goes, so the others go on syncing through a rebalance.
# Brokers that do not complete cooperative rebalances (the tansu of `make run` and the
# tests) take "range".
KAFKA_PARTITION_ASSIGNMENT_STRATEGY = env.str(
    "KAFKA_PARTITION_ASSIGNMENT_STRATEGY", default="cooperative-sticky"
)
ARIA_API_URL = env.str("ARIA_API_URL", default="http://127.0.0.1:8765/v1/core")
ARIA_CLIENT_NO = env.int("ARIA_CLIENT_NO", default=1000)
ARIA_AUTH_KEY = env.str("ARIA_AUTH_KEY", default="simulator-auth-key")
ARIA_TIMEOUT_SECONDS = env.float("ARIA_TIMEOUT_SECONDS", default=120.0)
# A consumer that has not polled for this long (one sync taking longer) leaves the group
# and its partitions move on; the batch's claim keeps the newcomer from sending it again.
KAFKA_MAX_POLL_INTERVAL_MS = env.int(
    "KAFKA_MAX_POLL_INTERVAL_MS", default=int(max(ARIA_TIMEOUT_SECONDS * 3, 300) * 1000)
)
# A batch claimed longer ago than this is taken to be abandoned (its worker died). A sync
# renews its claim before each call to core Aria, so this must outlast one call.
SYNC_CLAIM_STALE_SECONDS = env.float(
    "SYNC_CLAIM_STALE_SECONDS", default=ARIA_TIMEOUT_SECONDS + 60
)
# Records whose call's outcome is unknown (timeout, HTTP 5xx, an answer that cannot be
# mapped) are looked up in core Aria only this long after they were sent: a gateway can time
# out while core Aria's backend goes on storing them. 15 minutes is several times the
# longest timeout Aria itself uses (5 minutes in its SDK tests, 120-200 s in integrations).
SYNC_IN_DOUBT_SETTLE_SECONDS = env.float("SYNC_IN_DOUBT_SETTLE_SECONDS", default=900.0)
for _name in ("SYNC_CLAIM_STALE_SECONDS", "SYNC_IN_DOUBT_SETTLE_SECONDS"):
    if globals()[_name] <= ARIA_TIMEOUT_SECONDS:
        raise environ.ImproperlyConfigured(
            f"{_name} ({globals()[_name]:g}) must be longer than ARIA_TIMEOUT_SECONDS "
            f"({ARIA_TIMEOUT_SECONDS:g}): a call may take that long"
        )
SYNC_RETRY_BASE_SECONDS = env.float("SYNC_RETRY_BASE_SECONDS", default=5.0)
# A published batch still PENDING after this long is published again (lost message).
SYNC_REPUBLISH_AFTER_SECONDS = env.float("SYNC_REPUBLISH_AFTER_SECONDS", default=600.0)
# A worker's consumers join the group as static members named after the worker (its Celery
# host name) and their slot: a worker restarted under the same name takes its partitions
# back without a rebalance. Where worker names change at every start (ephemeral pods), turn
# it off: a member that never comes back holds its partitions for KAFKA_SESSION_TIMEOUT_MS.
KAFKA_STATIC_MEMBERSHIP = env.bool("KAFKA_STATIC_MEMBERSHIP", default=True)
# Kafka consumer processes each Celery worker runs beside its pool, for the worker's life
# (usage_sync/consumer.py); they take no pool slot. 0: a worker that does not sync.
SYNC_CONSUMERS_PER_WORKER = env.int("SYNC_CONSUMERS_PER_WORKER", default=2)

# Reprocess (reprocess/reprocess.py): a run of up to REPROCESS_INLINE_RECORDS records is
# queued within its request (a few tens of milliseconds); a larger one by a Celery task,
# REPROCESS_CHUNK_RECORDS per transaction, so locks stay short and syncing starts with the
# first chunk. A run still queueing this long after it was asked for is resumed by beat.
REPROCESS_INLINE_RECORDS = env.int("REPROCESS_INLINE_RECORDS", default=5000)
REPROCESS_CHUNK_RECORDS = env.int("REPROCESS_CHUNK_RECORDS", default=20_000)
REPROCESS_RESUME_AFTER_SECONDS = env.float("REPROCESS_RESUME_AFTER_SECONDS", default=60.0)
CELERY_BEAT_SCHEDULE["resume-reprocess-runs"] = {
    "task": "reprocess.tasks.resume_reprocess_runs",
    "schedule": min(30.0, REPROCESS_RESUME_AFTER_SECONDS),
}

# Logs: one JSON object per line in production, readable text lines when developing
# (allegro/logging.py); Celery worker and beat use the same (allegro/celery.py).
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default=default_log_format(debug=DEBUG))
LOGGING = logging_config(log_format=LOG_FORMAT, level=LOG_LEVEL)

# /metrics: open on the private network by default; with METRICS_TOKEN set it wants
# "Authorization: Bearer <token>". Broker lookups for consumer lag give up after this.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_KAFKA_TIMEOUT_SECONDS = env.float("METRICS_KAFKA_TIMEOUT_SECONDS", default=2.0)
# Each readiness check (/healthz/ready) gives up after this long.
HEALTH_CHECK_TIMEOUT_SECONDS = env.float("HEALTH_CHECK_TIMEOUT_SECONDS", default=2.0)
