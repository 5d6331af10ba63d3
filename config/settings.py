"""Settings for the MOLT gateway, all taken from the environment (see .env.example).

Defaults are for production safety: DEBUG is off and SECRET_KEY is required unless DJANGO_DEBUG
is true. `make run` and the test suite set DJANGO_DEBUG=true and get a development key.
"""

from pathlib import Path

import dj_database_url

from config.env import ImproperlyConfiguredEnv, env_bool, env_int, env_list, env_str

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
    # Staff accounts' second factor (frontend/staff_otp.py): TOTP devices only.
    "django_otp",
    "django_otp.plugins.otp_totp",
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
    # request.user.is_verified(): whether this session gave a TOTP code (django_otp).
    "django_otp.middleware.OTPMiddleware",
    # Staff pages (admin, ops dashboard) need that code: frontend/staff_otp.py.
    "frontend.staff_otp.StaffOtpMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Every HTML page (ours, and error pages) gets the site's CSP: frontend/security.py.
    "frontend.security.ContentSecurityPolicyMiddleware",
    # One person's pages and API answers are never cached: frontend/security.py.
    "frontend.security.PrivateNoStoreMiddleware",
    # Redis out of reach where a page needs the cache: 503, not 500 (frontend/unavailable.py).
    "frontend.unavailable.ServiceUnavailableMiddleware",
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
                "frontend.context_processors.demo",
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
# Persistent connections (issue 14): without them every database_sync_to_async call and every
# Celery task opened a new PostgreSQL session (a third of the web process's time at 500 agents).
# Channels' database_sync_to_async and Celery's Django fixup call close_old_connections around
# each unit of work, which keeps a connection younger than CONN_MAX_AGE and drops one that is
# older or broken; the health check pings a reused connection once per unit of work, so one
# that PostgreSQL dropped (restart, idle timeout) is replaced rather than failing a request.
# Connections are per thread: a web process holds one per database thread (the single
# thread-sensitive one plus the few of the default executor), a worker one per process.
DATABASES["default"]["CONN_MAX_AGE"] = env_int("MOLT_DB_CONN_MAX_AGE", 300, minimum=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
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
SECURE_REDIRECT_EXEMPT = [r"^healthz/$", r"^readyz/$"]

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
# Staff accounts need a TOTP code for the admin and the ops dashboard (frontend/staff_otp.py).
# Off only for development: `make run` leaves it on and prints the demo operator's key.
MOLT_STAFF_OTP_REQUIRED = env_bool("MOLT_STAFF_OTP_REQUIRED", True)
# The name authenticator apps show beside the account.
OTP_TOTP_ISSUER = "MOLT"
# How long an API token lasts from issue (marketplace.tokens); then it is refused.
MOLT_API_TOKEN_TTL_DAYS = env_int("MOLT_API_TOKEN_TTL_DAYS", 90, minimum=1)
# New accounts per client address per hour.
MOLT_SIGNUPS_PER_ADDRESS = env_int("MOLT_SIGNUPS_PER_ADDRESS", 10, minimum=1)
# The agents' websocket before and after authentication (meshnet/agent_guard.py). Frame limits
# in bytes: the auth frame is about 310 bytes; the largest frame an agent sends is a metering
# sample, about 130 bytes a peer. The web process's own --ws-max-size is the post-auth limit.
MOLT_AGENT_PREAUTH_MAX_BYTES = env_int("MOLT_AGENT_PREAUTH_MAX_BYTES", 4096, minimum=512)
MOLT_AGENT_MAX_FRAME_BYTES = env_int("MOLT_AGENT_MAX_FRAME_BYTES", 1024 * 1024, minimum=4096)
# Agent sockets per client address, per web process (in-process counters): not yet
# authenticated, and in all. 0: no limit. Many nodes behind one NAT share an address.
MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS = env_int(
    "MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS", 64, minimum=0
)
MOLT_AGENT_CONNECTIONS_PER_ADDRESS = env_int("MOLT_AGENT_CONNECTIONS_PER_ADDRESS", 1024, minimum=0)
# Every per-node frame rate and burst (agent_guard.RATES) multiplied by this: for agents run
# with periods shorter than clawnode's defaults (the integration tier's), or a gateway that
# wants more room.
MOLT_AGENT_RATE_FACTOR = env_int("MOLT_AGENT_RATE_FACTOR", 1, minimum=1)
SPECTACULAR_SETTINGS = {
    "TITLE": "MOLT gateway API",
    "DESCRIPTION": "GPU marketplace on a WireGuard mesh. Amounts are integers in micro-USD.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the vendored sidecar package: no CDN at run time.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # A multi-node order's derived state has its own enum beside the order's `state`.
    "ENUM_NAME_OVERRIDES": {
        "ClusterStateEnum": "marketplace.cluster_state.CHOICES",
        "OrderStateEnum": "marketplace.models.Order.State",
    },
    # Every operation's common error answers (400/401/403/404), in the one error shape.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "marketplace.api.schema.document_common_errors",
    ],
}

# --- Redis: Celery broker and Channels layer --------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            "prefix": env_str("MOLT_CHANNEL_PREFIX", "molt"),
            # All of a web process's connections receive through one Redis list, and a
            # message to a full one is dropped (logged at INFO by the sender only): at the
            # default of 100, a change pushed to 300 agents of one process reached 138 of
            # them (issue 14). Room for every agent of a process, several times over.
            "capacity": env_int("MOLT_CHANNEL_CAPACITY", 10_000, minimum=100),
        },
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
    "purge-expired-tokens": {
        "task": "marketplace.tasks.purge_expired_tokens",
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
    # Rotates only once the key is MOLT_GATEWAY_KEY_MAX_AGE_DAYS old: hourly, so within an hour.
    "rotate-gateway-key": {
        "task": "meshnet.tasks.rotate_gateway_key_if_due",
        "schedule": 3600.0,
    },
}

# --- MOLT ---------------------------------------------------------------------------------
# Where the gateway keeps its Ed25519 root key (created 0600 on first use).
MOLT_STATE_DIR = Path(env_str("MOLT_STATE_DIR", str(BASE_DIR / "var" / "state")))
# Automatic rotation of that key (meshnet.tasks.rotate_gateway_key_if_due, beat): once it has
# signed this many days; 0 turns it off (`manage.py rotate_gateway_key` still rotates by hand).
# Web, worker and hub must share MOLT_STATE_DIR, as they must to sign with the same key at all.
MOLT_GATEWAY_KEY_MAX_AGE_DAYS = env_int("MOLT_GATEWAY_KEY_MAX_AGE_DAYS", 90, minimum=0)
MOLT_CURRENCY = "USD"
MOLT_CURRENCY_UNIT = "micro"  # every amount is an integer number of micro-USD
MOLT_PLATFORM_FEE_BPS = env_int("MOLT_PLATFORM_FEE_BPS", 1000, minimum=0)
MOLT_BANDWIDTH_ALLOWANCE_GIB = env_int("MOLT_BANDWIDTH_ALLOWANCE_GIB", 50, minimum=0)
MOLT_MAX_ORDER_HOURS = env_int("MOLT_MAX_ORDER_HOURS", 720, minimum=1)
MOLT_ENROLLMENT_TOKEN_TTL_SECONDS = env_int("MOLT_ENROLLMENT_TOKEN_TTL_SECONDS", 3600, minimum=60)
MOLT_ENROLLMENT_MAX_SKEW_SECONDS = env_int("MOLT_ENROLLMENT_MAX_SKEW_SECONDS", 300, minimum=5)
# A released node mesh address (the MOLT /17) is not handed out again for this long: only stray
# packets to a node that left are left to drain.
MOLT_ADDRESS_QUARANTINE_SECONDS = env_int("MOLT_ADDRESS_QUARANTINE_SECONDS", 120, minimum=0)
# A released job tunnel address (the "jobs" /11) waits this long. The removed peer's key can no
# longer complete a handshake on the node, so a stale buyer config reaches nobody whatever the
# address; the quarantine only covers packets in flight and the node's own removal catching up.
# A long one buys nothing and starves the pool (docs/ip-plan.md): at a day, the old MOLT /17
# capped the market at 0.38 job starts per second.
MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = env_int("MOLT_JOB_ADDRESS_QUARANTINE_SECONDS", 120, minimum=0)
# A released sandbox address (per node /27, 30 addresses) waits this long: it is freed only
# once the agent removed the container and the job's peer, so only stray packets are left.
MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS = env_int(
    "MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS", 60, minimum=0
)
MOLT_WORKLOAD_POOL_MAX_NODES = env_int("MOLT_WORKLOAD_POOL_MAX_NODES", 256, minimum=1)
MOLT_PROVISIONING_TIMEOUT_SECONDS = env_int("MOLT_PROVISIONING_TIMEOUT_SECONDS", 120, minimum=5)
# The reprovision-pending sweep takes orders still pending this long after placement: long
# enough that the task enqueued on commit normally got there first. The faults tier shortens it.
MOLT_PENDING_SWEEP_AFTER_SECONDS = env_int("MOLT_PENDING_SWEEP_AFTER_SECONDS", 20, minimum=1)
MOLT_NODE_OFFLINE_AFTER_SECONDS = env_int("MOLT_NODE_OFFLINE_AFTER_SECONDS", 45, minimum=5)
# Heartbeats are written in batches this often (meshnet.liveness); a third of the offline
# limit at most, so a batch never hides a silence that the limit would call an outage.
MOLT_HEARTBEAT_FLUSH_SECONDS = min(
    env_int("MOLT_HEARTBEAT_FLUSH_SECONDS", 5, minimum=1), MOLT_NODE_OFFLINE_AFTER_SECONDS // 3
)
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
# `make run` sets it to what its demo nodes are (scripts/run_dev.py): "simulated" (in-memory
# WireGuard: the pages say their tunnels carry no traffic), "real" (clawnode daemons) or "0".
MOLT_DEMO_SIMULATED_AGENTS = env_str("MOLT_DEMO_AGENTS", "") == "simulated"
MOLT_WIREGUARD_LISTEN_PORT = env_int("MOLT_WIREGUARD_LISTEN_PORT", 51820, minimum=1)
# The gateway's WireGuard hub (`manage.py run_hub`, docs/nat.md): a peer of every node, so its
# view of each peer's endpoint is that node's public mapping (endpoint discovery). Off while
# MOLT_HUB_ENDPOINT is empty: desired states then carry no hub peer. MOLT_HUB_ENDPOINT is the
# host:port nodes send to (the hub's public address and MOLT_HUB_PORT, or a forward to it).
MOLT_HUB_ENDPOINT = env_str("MOLT_HUB_ENDPOINT", "")
MOLT_HUB_PORT = env_int("MOLT_HUB_PORT", 51800, minimum=1)
MOLT_HUB_INTERFACE = env_str("MOLT_HUB_INTERFACE", "molthub")
# The node's keepalive toward the hub: what keeps its NAT mapping open and the hub's view of
# it current. 25 s is below every common NAT's UDP timeout (RFC 4787 REQ-5: at least 120 s).
MOLT_HUB_KEEPALIVE_SECONDS = env_int("MOLT_HUB_KEEPALIVE_SECONDS", 25, minimum=1)
# How often the hub reads its peers' endpoints, and re-reads its peer set from the database.
MOLT_HUB_POLL_SECONDS = env_int("MOLT_HUB_POLL_SECONDS", 1, minimum=1)
MOLT_HUB_RECONCILE_SECONDS = env_int("MOLT_HUB_RECONCILE_SECONDS", 5, minimum=1)
# Relays (meshnet.relay, docs/nat.md step 3; listed in the admin). "nat": a job peer on a node
# with no declared endpoint (behind a NAT) goes through a live relay of the node's region (else
# of any region) when one is listed; "always": every job peer, where a relay is live; "off":
# none. A relay is live while it asked for its pairs in the last MOLT_RELAY_LIVE_SECONDS.
MOLT_RELAY_MODE = env_str("MOLT_RELAY_MODE", "nat")
if MOLT_RELAY_MODE not in ("off", "nat", "always"):
    raise ImproperlyConfiguredEnv("MOLT_RELAY_MODE must be off, nat or always")
MOLT_RELAY_LIVE_SECONDS = env_int("MOLT_RELAY_LIVE_SECONDS", 30, minimum=2)
# With "nat": each relayed pair gets one try at the direct path once the hub has seen the
# buyer's mapping (meshnet.relays.can_go_direct; the relay stays until the buyer's client is seen
# to roam, and takes the tunnel back if it does not), as Tailscale starts on DERP and upgrades.
MOLT_RELAY_TRY_DIRECT = env_bool("MOLT_RELAY_TRY_DIRECT", True)

# --- Card top-ups through Stripe Checkout (marketplace/stripe_checkout.py) ----------------------
# Both keys set: the wallet page offers "Pay with card"; either missing: card top-ups are off and
# the wallet page says so (the operator's grant still works).
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
# Where the Stripe API is: Stripe's own by default; tests point it at a local stand-in.
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "https://api.stripe.com")
# The origin of Stripe's hosted checkout page: the wallet page's Content-Security-Policy lets its
# "Pay with card" form (redirected there) go to it and nowhere else.
STRIPE_CHECKOUT_ORIGIN = env_str("STRIPE_CHECKOUT_ORIGIN", "https://checkout.stripe.com")
# Bounds of one card top-up, in whole USD.
MOLT_CARD_TOP_UP_MIN_USD = env_int("MOLT_CARD_TOP_UP_MIN_USD", 5, minimum=1)
MOLT_CARD_TOP_UP_MAX_USD = env_int(
    "MOLT_CARD_TOP_UP_MAX_USD", 1000, minimum=MOLT_CARD_TOP_UP_MIN_USD
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
