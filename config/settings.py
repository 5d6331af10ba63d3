"""Settings for the MOLT gateway, all taken from the environment (see .env.example).

Defaults are for production safety: DEBUG is off and SECRET_KEY is required unless DJANGO_DEBUG
is true. `make run` and the test suite set DJANGO_DEBUG=true and get a development key.
"""

from pathlib import Path

import dj_database_url

from config.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
if DEBUG:
    SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-key-never-used-in-production-0123456789")
else:
    SECRET_KEY = env_str("SECRET_KEY")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "meshnet",
    "marketplace",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Every HTML page (ours, and error pages) gets the site's CSP: frontend/security.py.
    "frontend.security.ContentSecurityPolicyMiddleware",
    # One person's pages and API answers are never cached: frontend/security.py.
    "frontend.security.PrivateNoStoreMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

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
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# SQLite is the embedded default; PostgreSQL (DATABASE_URL=postgres://...) in production.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'molt.sqlite3'}")
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite serializes writers. IMMEDIATE takes the write lock at BEGIN, so two transactions
    # never both read and then deadlock upgrading to write; WAL lets readers run beside the
    # writer; the timeout makes a second writer wait instead of failing at once.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "/"

# --- Security (production values unless DEBUG) ---------------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# The health check is probed over plain HTTP inside the container network.
SECURE_REDIRECT_EXEMPT = [r"^healthz/$"]

# --- REST API --------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "marketplace.api.parsing.BoundedLimitOffsetPagination",
    "DEFAULT_PARSER_CLASSES": [
        "marketplace.api.parsing.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.api.errors.exception_handler",
    # Calls that take a credential with no account behind them (meshnet/throttling.py).
    "DEFAULT_THROTTLE_RATES": {
        "auth": env_str("MOLT_THROTTLE_AUTH", "10/min"),
        "enroll": env_str("MOLT_THROTTLE_ENROLL", "60/min"),
    },
    # Limits count REMOTE_ADDR, which uvicorn's --proxy-headers already sets to the client's
    # address behind a trusted proxy; set this only where proxies append to X-Forwarded-For
    # and the server does not (never trust a header the client can write).
    "NUM_PROXIES": env_int("MOLT_TRUSTED_PROXIES", 0, minimum=0),
}
# Failed log-ins on every password form (site, admin, API token): per account from one address
# (failures, window in seconds), per account from anywhere, per address for any account
# (meshnet/throttling.py LoginGuard).
MOLT_LOGIN_FAILURES = (
    env_int("MOLT_LOGIN_FAILURES", 10, minimum=1),
    env_int("MOLT_LOGIN_FAILURE_WINDOW_SECONDS", 900, minimum=1),
)
MOLT_LOGIN_FAILURES_PER_ACCOUNT = env_int("MOLT_LOGIN_FAILURES_PER_ACCOUNT", 50, minimum=1)
MOLT_LOGIN_FAILURES_PER_ADDRESS = env_int("MOLT_LOGIN_FAILURES_PER_ADDRESS", 100, minimum=1)
# How long an API token lasts from issue (marketplace.tokens); then it is refused.
MOLT_API_TOKEN_TTL_DAYS = env_int("MOLT_API_TOKEN_TTL_DAYS", 90, minimum=1)
# New accounts per client address per hour.
MOLT_SIGNUPS_PER_ADDRESS = env_int("MOLT_SIGNUPS_PER_ADDRESS", 10, minimum=1)
SPECTACULAR_SETTINGS = {
    "TITLE": "MOLT gateway API",
    "DESCRIPTION": "GPU marketplace on a WireGuard mesh. Amounts are integers in micro-USD.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the vendored sidecar package: no CDN at run time.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Redis: Celery broker and Channels layer --------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": env_str("MOLT_CHANNEL_PREFIX", "molt")},
    }
}
# Rate-limit counters (meshnet/throttling.py) must be shared by every gateway process.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env_str("MOLT_CACHE_URL", REDIS_URL),
        "KEY_PREFIX": env_str("MOLT_CHANNEL_PREFIX", "molt"),
    }
}
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A task not acknowledged within this is redelivered (after a worker died without giving it
# back); no task uses an ETA or countdown beyond it. Workers look for such messages about every
# tenth of it (at most every 100 s). Tests of crash recovery shorten it.
CELERY_VISIBILITY_TIMEOUT_SECONDS = env_int("CELERY_VISIBILITY_TIMEOUT_SECONDS", 3600, minimum=1)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT_SECONDS,
    "unacked_restore_interval": max(1, min(10, CELERY_VISIBILITY_TIMEOUT_SECONDS // 100)),
    "unacked_restore_throttle": 1 if CELERY_VISIBILITY_TIMEOUT_SECONDS < 1000 else 10,
}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULE = {
    "expire-orders": {"task": "marketplace.tasks.expire_orders", "schedule": 15.0},
    "settle-completed": {"task": "marketplace.tasks.sweep_settlements", "schedule": 60.0},
    "reprovision-pending": {"task": "marketplace.tasks.sweep_pending_orders", "schedule": 30.0},
    "repush-lagging-nodes": {"task": "meshnet.tasks.repush_lagging_nodes", "schedule": 10.0},
    "release-earnings": {"task": "marketplace.tasks.release_due_earnings", "schedule": 60.0},
    "refresh-reliability": {"task": "marketplace.tasks.refresh_reliability", "schedule": 60.0},
    "purge-idempotency-keys": {
        "task": "marketplace.tasks.purge_idempotency_keys",
        "schedule": 3600.0,
    },
    "audit-ledger": {"task": "marketplace.tasks.audit_ledger", "schedule": 3600.0},
    "prune-used-nonces": {"task": "meshnet.tasks.prune_used_nonces", "schedule": 3600.0},
    "prune-metering-samples": {
        "task": "meshnet.tasks.prune_metering_samples",
        "schedule": 3600.0,
    },
    "close-out-silent-nodes": {
        "task": "meshnet.tasks.close_out_silent_nodes",
        "schedule": 3600.0,
    },
}

# --- MOLT ---------------------------------------------------------------------------------
# Where the gateway keeps its Ed25519 root key (created 0600 on first use).
MOLT_STATE_DIR = Path(env_str("MOLT_STATE_DIR", str(BASE_DIR / "var" / "state")))
MOLT_CURRENCY = "USD"
MOLT_CURRENCY_UNIT = "micro"  # every amount is an integer number of micro-USD
MOLT_PLATFORM_FEE_BPS = env_int("MOLT_PLATFORM_FEE_BPS", 1000, minimum=0)
MOLT_BANDWIDTH_ALLOWANCE_GIB = env_int("MOLT_BANDWIDTH_ALLOWANCE_GIB", 50, minimum=0)
MOLT_MAX_ORDER_HOURS = env_int("MOLT_MAX_ORDER_HOURS", 720, minimum=1)
MOLT_ENROLLMENT_TOKEN_TTL_SECONDS = env_int("MOLT_ENROLLMENT_TOKEN_TTL_SECONDS", 3600, minimum=60)
MOLT_ENROLLMENT_MAX_SKEW_SECONDS = env_int("MOLT_ENROLLMENT_MAX_SKEW_SECONDS", 300, minimum=5)
# A released job address is not handed out again for this long. The removed peer's key can no
# longer complete a handshake on the node, so a stale buyer config reaches nobody whatever the
# address; the quarantine only covers packets in flight and the node's own removal catching up.
# A long one buys nothing and starves the pool (design/network.md): at a day, the MOLT /17
# capped the market at 0.38 job starts per second.
MOLT_ADDRESS_QUARANTINE_SECONDS = env_int("MOLT_ADDRESS_QUARANTINE_SECONDS", 120, minimum=0)
# A released sandbox address (per node /27, 30 addresses) waits this long: it is freed only
# once the agent removed the container and the job's peer, so only stray packets are left.
MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS = env_int(
    "MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS", 60, minimum=0
)
MOLT_WORKLOAD_POOL_MAX_NODES = env_int("MOLT_WORKLOAD_POOL_MAX_NODES", 256, minimum=1)
MOLT_PROVISIONING_TIMEOUT_SECONDS = env_int("MOLT_PROVISIONING_TIMEOUT_SECONDS", 120, minimum=5)
MOLT_NODE_OFFLINE_AFTER_SECONDS = env_int("MOLT_NODE_OFFLINE_AFTER_SECONDS", 45, minimum=5)
# Running orders of a node silent this long fail (time up to its last heartbeat is billed).
MOLT_NODE_FAILURE_GRACE_SECONDS = env_int("MOLT_NODE_FAILURE_GRACE_SECONDS", 300, minimum=5)
# Peer removals on a node silent this long are closed out without its acknowledgement (job
# addresses and keys freed). Far beyond the grace above: the orders ended long before.
MOLT_NODE_ABANDONED_AFTER_SECONDS = env_int(
    "MOLT_NODE_ABANDONED_AFTER_SECONDS",
    7 * 86400,
    minimum=max(3600, MOLT_NODE_FAILURE_GRACE_SECONDS + 1),
)
# A buyer may dispute a settled order this long after settlement; the provider's share stays
# frozen until then.
MOLT_DISPUTE_WINDOW_SECONDS = env_int("MOLT_DISPUTE_WINDOW_SECONDS", 72 * 3600, minimum=0)
# Signed metering samples are kept this long (the bills' proof and the orders' usage charts),
# at least as long as the longest order plus its dispute window: every sample of an order that
# can still be disputed is there.
MOLT_METERING_RETENTION_DAYS = env_int(
    "MOLT_METERING_RETENTION_DAYS",
    90,
    minimum=-(-(MOLT_MAX_ORDER_HOURS * 3600 + MOLT_DISPUTE_WINDOW_SECONDS) // 86400) + 1,
)
# Idempotency keys are kept at least this long (issue 4: 24 h at least).
MOLT_IDEMPOTENCY_KEY_TTL_SECONDS = env_int("MOLT_IDEMPOTENCY_KEY_TTL_SECONDS", 86400, minimum=86400)
# A request holding an Idempotency-Key this long without finishing is presumed crashed; a
# retry with the key then runs it (its own writes never committed: see api/idempotency.py).
MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS = env_int("MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS", 60, minimum=5)
# Reliability scores look at this much history.
MOLT_RELIABILITY_WINDOW_SECONDS = env_int(
    "MOLT_RELIABILITY_WINDOW_SECONDS", 30 * 86400, minimum=3600
)
# Let any signed-in user top up their own wallet (demo only; operators always can).
MOLT_ALLOW_SELF_TOP_UP = env_bool("MOLT_ALLOW_SELF_TOP_UP", DEBUG)
MOLT_ALLOW_SIMULATED_GPUS = env_bool("MOLT_ALLOW_SIMULATED_GPUS", DEBUG)
MOLT_WIREGUARD_LISTEN_PORT = env_int("MOLT_WIREGUARD_LISTEN_PORT", 51820, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
