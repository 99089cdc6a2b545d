"""Django settings, read from the environment. `python -m config.stack` sets the variables for the
embedded servers; in external mode the operator sets them (see README, Configuration)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import dj_database_url

from config.env import ConfigError, env_bool, env_float, env_int, env_list, env_str, state_dir

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = state_dir()


def _secret_key() -> str:
    from_env = env_str("DJANGO_SECRET_KEY", "-")
    if from_env != "-":
        return from_env
    # Embedded mode: one key per state folder, made on first start and kept.
    key_file = STATE_DIR / "secret_key"
    if not key_file.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "registry",
    "pipelines",
    "deployer",
    "monitoring",
    "frontend",
]

MIDDLEWARE = [
    "registry.api.guard.ApiGuard",  # first: under /api/, refuses unstorable input and makes every error JSON
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "frontend.context.roles",
            ],
        },
    }
]

try:
    DATABASE_URL = env_str("DATABASE_URL")
except ConfigError:
    raise ConfigError(
        "DATABASE_URL is not set. Start the platform with `make run` (embedded PostgreSQL) "
        "or set DATABASE_URL=postgresql://user:password@host:port/dbname"
    ) from None
# Persistent connections without a per-request health check (a SELECT 1 round trip on every request):
# a connection that died fails one request, and Django replaces it for the next.
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=False)}
# Server-side prepared statements, used only by the registry's hot reads (registry/prepared.py; Django's
# own cursors bind on the client and never prepare). psycopg prepares nothing when this is None: set
# DATABASE_PREPARED_STATEMENTS=false behind a pooler that cannot keep them (PgBouncer before 1.21 in
# transaction mode).
DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
    5 if env_bool("DATABASE_PREPARED_STATEMENTS", True) else None
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

# MLflow: its tracking/registry store lives in PostgreSQL (its own database by default, on the same
# server); artifacts under a local folder unless an object store URI is given.
MLFLOW_BACKEND_STORE_URI = env_str("MLFLOW_BACKEND_STORE_URI", "")
MLFLOW_ARTIFACTS_URI = env_str("MLFLOW_ARTIFACTS_URI", str(STATE_DIR / "mlartifacts"))

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "frontend:model-list"
LOGOUT_REDIRECT_URL = "frontend:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = STATE_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

# Uploads: archives stream to disk; the registry enforces its own limits on top.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_TEMP_DIR = None

PLATFORM: dict[str, Any] = {
    # Largest model archive accepted, compressed (bytes).
    "MAX_UPLOAD_BYTES": env_int("PLATFORM_MAX_UPLOAD_BYTES", 512 * 1024 * 1024),
    # Largest total size once unpacked, and most members, to stop archive bombs.
    "MAX_UNPACKED_BYTES": env_int("PLATFORM_MAX_UNPACKED_BYTES", 2 * 1024 * 1024 * 1024),
    "MAX_ARCHIVE_MEMBERS": env_int("PLATFORM_MAX_ARCHIVE_MEMBERS", 10_000),
    "MAX_COMPRESSION_RATIO": env_int("PLATFORM_MAX_COMPRESSION_RATIO", 200),
    # Refuse flavors whose artifacts are pickles (sklearn, pytorch, cloudpickle pyfunc) outright.
    "REFUSE_PICKLE_FLAVORS": env_bool("PLATFORM_REFUSE_PICKLE_FLAVORS", False),
    # Seconds an isolated model inspection may take before it is stopped.
    "INSPECT_TIMEOUT_S": env_int("PLATFORM_INSPECT_TIMEOUT_S", 120),
    # The model sandbox (registry/confinement.py): the unprivileged identity model code runs as (a uid of its
    # own: not nobody, which the embedded PostgreSQL runs as), and its limits (CPU seconds, address space,
    # largest file written, processes and threads of that uid).
    "SANDBOX_UID": env_int("PLATFORM_SANDBOX_UID", 61000),
    "SANDBOX_GID": env_int("PLATFORM_SANDBOX_GID", 61000),
    "SANDBOX_CPU_S": env_int("PLATFORM_SANDBOX_CPU_S", 1800),
    "SANDBOX_MEMORY_BYTES": env_int("PLATFORM_SANDBOX_MEMORY_BYTES", 8 * 1024 * 1024 * 1024),
    "SANDBOX_FILE_BYTES": env_int("PLATFORM_SANDBOX_FILE_BYTES", 4 * 1024 * 1024 * 1024),
    "SANDBOX_PROCESSES": env_int("PLATFORM_SANDBOX_PROCESSES", 512),
    # Where the sandbox cannot be set up (no root, no namespaces), pickle-based flavors are refused;
    # true loads them anyway in a plain child process with a scrubbed environment, which is not isolation.
    "ALLOW_UNCONFINED_MODEL_CODE": env_bool("PLATFORM_ALLOW_UNCONFINED_MODEL_CODE", False),
    "TOKEN_DEFAULT_DAYS": env_int("PLATFORM_TOKEN_DEFAULT_DAYS", 90),
    # Hardware targets with workers: engine variants are planned for these (cpu, gpu).
    "BUILD_TARGETS": env_list("PLATFORM_BUILD_TARGETS", ["cpu"]),
    # A worker serving hardware targets (pseudo-queue `hil`, pipelines/hardware.py) announces itself this
    # often; three missed announcements and it no longer counts as live.
    "HIL_HEARTBEAT_S": env_float("PLATFORM_HIL_HEARTBEAT_S", 5.0),
    # Hardware-in-the-loop runs (pipelines/hil_runner.py). The serving fleet's hardware profile per deployment
    # target ("" for cpu: this machine's, which the local fleet runs on); the profiles each kept engine is
    # measured on (empty: the fleet's); runs requested when an engine is kept; deployments refused without
    # a passing run on the fleet's profile (GATE); how long a run waits for a worker of its profile.
    "FLEET_PROFILE": env_str("PLATFORM_FLEET_PROFILE", ""),
    "FLEET_GPU_PROFILE": env_str("PLATFORM_FLEET_GPU_PROFILE", ""),
    "HIL_PROFILES": env_list("PLATFORM_HIL_PROFILES", []),
    "HIL_AUTO": env_bool("PLATFORM_HIL_AUTO", True),
    "HIL_GATE": env_bool("PLATFORM_HIL_GATE", True),
    # A model with no explicit protection setting is protected once it has been deployed (registry/governance.py).
    "PROTECT_DEPLOYED": env_bool("PLATFORM_PROTECT_DEPLOYED", True),
    "HIL_WAIT_TIMEOUT_S": env_int("PLATFORM_HIL_WAIT_TIMEOUT_S", 3600),
    # The sweep: client concurrencies, seconds per measurement window, windows at most per point, and the
    # seconds after which a silent running run is handed back to wait for another worker.
    "HIL_CONCURRENCIES": [int(c) for c in env_list("PLATFORM_HIL_CONCURRENCIES", ["1", "2", "4"])],
    "HIL_WINDOW_S": env_float("PLATFORM_HIL_WINDOW_S", 1.0),
    "HIL_MAX_TRIALS": env_int("PLATFORM_HIL_MAX_TRIALS", 10),
    "HIL_STALE_S": env_int("PLATFORM_HIL_STALE_S", 120),
    # Run the HIL server and its load clients on CPUs of their own (pipelines/hil.py cpu_split).
    "HIL_PIN_CPUS": env_bool("PLATFORM_HIL_PIN_CPUS", True),
    # Seconds an engine build may take, and after which a silent build is handed to another worker.
    "BUILD_TIMEOUT_S": env_int("PLATFORM_BUILD_TIMEOUT_S", 900),
    "BUILD_STALE_S": env_int("PLATFORM_BUILD_STALE_S", 120),
    # Work waiting for a worker (a validation, a queued build) that no live worker holds is sent again
    # after this many seconds: its message was lost with a broker or a worker.
    "REDISPATCH_S": env_int("PLATFORM_REDISPATCH_S", 15),
    # Serving fleet: "local" (Triton processes on this machine) or "kubernetes" (see deployer/kube.py).
    "FLEET": env_str("PLATFORM_FLEET", "local"),
    # Rollout defaults; each deployment may set its own. Steps are canary traffic percents.
    "ROLLOUT_STEPS": [int(s) for s in env_list("PLATFORM_ROLLOUT_STEPS", ["10", "25", "50"])],
    "ROLLOUT_STEP_INTERVAL_S": env_int("PLATFORM_ROLLOUT_STEP_INTERVAL_S", 30),
    "ROLLOUT_BAKE_S": env_int("PLATFORM_ROLLOUT_BAKE_S", 30),
    "ROLLOUT_MAX_P99_MS": env_float("PLATFORM_ROLLOUT_MAX_P99_MS", 500.0),
    "ROLLOUT_MAX_ERROR_RATE": env_float("PLATFORM_ROLLOUT_MAX_ERROR_RATE", 0.01),
    "ROLLOUT_MIN_REQUESTS": env_int("PLATFORM_ROLLOUT_MIN_REQUESTS", 20),
    # The reconciler's tick, the analysis window, how long a canary may take to load, and how long an
    # unrouted model keeps serving requests already sent to it.
    "ROLLOUT_TICK_S": env_float("PLATFORM_ROLLOUT_TICK_S", 2.0),
    "ROLLOUT_WINDOW_S": env_float("PLATFORM_ROLLOUT_WINDOW_S", 10.0),
    "ROLLOUT_LOAD_TIMEOUT_S": env_int("PLATFORM_ROLLOUT_LOAD_TIMEOUT_S", 300),
    "ROLLOUT_DRAIN_S": env_float("PLATFORM_ROLLOUT_DRAIN_S", 3.0),
    # After a weight change, seconds before the step's window counts (connections and caches settle);
    # and how long a step with too little evidence to judge is extended before the rollout pauses.
    "ROLLOUT_SETTLE_S": env_float("PLATFORM_ROLLOUT_SETTLE_S", 4.0),
    "ROLLOUT_EXTEND_MAX_S": env_float("PLATFORM_ROLLOUT_EXTEND_MAX_S", 120.0),
    # A step whose time is up without enough canary requests to judge replays recorded stable requests (the
    # gateway's samples no older than MAX_AGE_S) against the canary, at most RATE a second (0: never) and
    # for at most BUDGET_S, off every client's path (deployer/shadow.py).
    "ROLLOUT_REPLAY_RATE": env_float("PLATFORM_ROLLOUT_REPLAY_RATE", 50.0),
    "ROLLOUT_REPLAY_BUDGET_S": env_float("PLATFORM_ROLLOUT_REPLAY_BUDGET_S", 5.0),
    "ROLLOUT_REPLAY_MAX_AGE_S": env_float("PLATFORM_ROLLOUT_REPLAY_MAX_AGE_S", 3600.0),
    # Notifications (monitoring/notify.py): each webhook delivery is tried at most WEBHOOK_ATTEMPTS times,
    # waiting WEBHOOK_BACKOFF_S after the first failure, doubling, at most WEBHOOK_BACKOFF_MAX_S (also the
    # most a receiver's Retry-After is honoured); one attempt waits WEBHOOK_CONNECT_TIMEOUT_S to connect and
    # WEBHOOK_READ_TIMEOUT_S for each read of the answer.
    "WEBHOOK_ATTEMPTS": env_int("PLATFORM_WEBHOOK_ATTEMPTS", 6),
    "WEBHOOK_BACKOFF_S": env_float("PLATFORM_WEBHOOK_BACKOFF_S", 5.0),
    "WEBHOOK_BACKOFF_MAX_S": env_float("PLATFORM_WEBHOOK_BACKOFF_MAX_S", 300.0),
    "WEBHOOK_CONNECT_TIMEOUT_S": env_float("PLATFORM_WEBHOOK_CONNECT_TIMEOUT_S", 3.0),
    "WEBHOOK_READ_TIMEOUT_S": env_float("PLATFORM_WEBHOOK_READ_TIMEOUT_S", 5.0),
    # Monitoring: the gateway's samples become captured rows every CAPTURE_S; every serving version's
    # window is checked for drift every DRIFT_INTERVAL_S (monitoring/).
    "CAPTURE_S": env_float("PLATFORM_CAPTURE_S", 2.0),
    "DRIFT_INTERVAL_S": env_float("PLATFORM_DRIFT_INTERVAL_S", 300.0),
    # An alert resolves by itself once its condition has been clear this long; a firing one nobody
    # acknowledged is notified again this often.
    "ALERT_RESOLVE_AFTER_S": env_float("PLATFORM_ALERT_RESOLVE_AFTER_S", 900.0),
    "ALERT_RENOTIFY_S": env_float("PLATFORM_ALERT_RENOTIFY_S", 3600.0),
    # SLO burn rates: each serving version is sampled at every gateway this often (monitoring/slo.py); with
    # PROMETHEUS_URL set the figures come from that Prometheus instead.
    "SLO_SAMPLE_S": env_float("PLATFORM_SLO_SAMPLE_S", 60.0),
    "PROMETHEUS_URL": env_str("PROMETHEUS_URL", ""),
    # Where people reach the web UI (links in notifications); make run sets it.
    "BASE_URL": env_str("PLATFORM_BASE_URL", ""),
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "registry.auth.TokenAuthentication",
        "registry.auth.BasicPasswordAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "registry.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "registry.api.errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    # DRF's negotiation, with a shortcut for clients that accept anything or JSON (most API calls).
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "registry.api.negotiation.CommonCaseFirst",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "MLOps platform API",
    "DESCRIPTION": "Registry, engine builds, deployments and monitoring. Authenticate with "
    "`Authorization: Bearer <token>` (create tokens in the web UI under Tokens).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Workers and beat reconnect forever; a publish from a request fails fast (the outbox keeps the work).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 10}
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BEAT_SCHEDULE = {
    "registry-reconcile": {"task": "registry.tasks.registry_reconcile", "schedule": 60.0,
                           "options": {"queue": "reconcile"}},
    # The reconcilers have a queue of their own (the deployer's worker takes it too), so a worker busy
    # with validations and builds never holds back the pass that takes over what a dead worker left.
    "validations-reconcile": {"task": "registry.tasks.validations_reconcile", "schedule": 5.0,
                              "options": {"queue": "reconcile", "expires": 5.0}},
    "engine-builds-reconcile": {"task": "pipelines.tasks.engine_builds_reconcile", "schedule": 5.0,
                                "options": {"queue": "reconcile", "expires": 5.0}},
    "hil-runs-reconcile": {"task": "pipelines.tasks.hil_runs_reconcile", "schedule": 5.0,
                           "options": {"queue": "reconcile", "expires": 5.0}},
    # Webhook deliveries due whose message was lost (a broker or worker gone with a retry's countdown).
    "deliveries-reconcile": {"task": "monitoring.tasks.deliveries_reconcile", "schedule": 5.0,
                             "options": {"queue": "reconcile", "expires": 5.0}},
    # Outbound events: the audit log past the dispatcher's cursor, told to the receivers subscribed to it.
    "events-dispatch": {"task": "monitoring.tasks.events_dispatch", "schedule": 5.0,
                        "options": {"queue": "reconcile", "expires": 5.0}},
    "rollouts-reconcile": {"task": "deployer.tasks.rollouts_reconcile", "schedule": PLATFORM["ROLLOUT_TICK_S"],
                           "options": {"queue": "deployer", "expires": PLATFORM["ROLLOUT_TICK_S"] * 2}},
    "capture-ingest": {"task": "monitoring.tasks.capture_ingest", "schedule": PLATFORM["CAPTURE_S"],
                       "options": {"expires": PLATFORM["CAPTURE_S"] * 2}},
    "capture-forget": {"task": "monitoring.tasks.capture_forget", "schedule": 3600.0},
    "slo-tick": {"task": "deployer.tasks.slo_tick", "schedule": PLATFORM["SLO_SAMPLE_S"],
                 "options": {"expires": PLATFORM["SLO_SAMPLE_S"]}},
    "alerts-tick": {"task": "monitoring.tasks.alerts_tick", "schedule": 60.0, "options": {"expires": 60.0}},
    "drift-checks": {"task": "deployer.tasks.drift_checks", "schedule": PLATFORM["DRIFT_INTERVAL_S"],
                     "options": {"expires": PLATFORM["DRIFT_INTERVAL_S"]}},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "alembic": {"level": "WARNING"},
        "django.request": {"level": "ERROR"},
    },
}
