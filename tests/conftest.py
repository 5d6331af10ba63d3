"""Test tiers, their prerequisites, and the personas every test module uses.

A tier whose prerequisites are missing is skipped with the reason printed; under CI=true any
skip fails the run (CI must prove every tier).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Tasks enqueued by code under test stay in this process's memory: they must never land in the
# Redis of a developer's `make run`. Integration tests start their own worker on a Redis db of
# their own (tests/integration/conftest.py).
os.environ["CELERY_BROKER_URL"] = "memory://"
REPO = Path(__file__).resolve().parent.parent

# Tests never assert wall-clock times (design/testing.md), and Hypothesis's per-example deadline
# is one: on a loaded 2-core machine it failed billing properties that were right.
hypothesis_settings.register_profile("molt", deadline=None)
hypothesis_settings.load_profile("molt")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


WIREGUARD_PACKAGES = "apt-get install wireguard-go wireguard-tools nftables iproute2"


@functools.cache
def _missing_for(tier: str) -> str | None:
    """Why `tier` cannot run here, or None when it can."""
    from django.conf import settings

    vendor = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    if tier == "postgres" and vendor != "postgresql":
        return f"needs PostgreSQL, the database is {vendor} (set DATABASE_URL=postgres://...)"
    if tier in {"integration", "browser", "netns"}:
        if vendor != "postgresql":
            return f"needs PostgreSQL, the database is {vendor}"
        if not _port_open("127.0.0.1", 6379):
            return "needs Redis on 127.0.0.1:6379"
    if tier == "netns":
        if os.geteuid() != 0:
            return "needs root (network namespaces)"
        if not os.path.exists("/dev/net/tun"):
            return "needs /dev/net/tun"
        for tool in ("wireguard-go", "wg", "nft", "ip"):
            if shutil.which(tool) is None:
                return f"needs {tool} ({WIREGUARD_PACKAGES})"
        if shutil.which("systemd-nspawn") is None:
            return "needs systemd-nspawn (apt-get install systemd-container)"
    if tier == "nat":
        if os.geteuid() != 0:
            return "needs root (network namespaces, nftables)"
        if not os.path.exists("/dev/net/tun"):
            return "needs /dev/net/tun"
        for tool in ("wireguard-go", "wg", "nft", "ip"):
            if shutil.which(tool) is None:
                return f"needs {tool} ({WIREGUARD_PACKAGES})"
    if tier == "faults":
        # Its own redis-server (stopped and restarted by the tests), never the shared one.
        if vendor != "postgresql":
            return f"needs PostgreSQL, the database is {vendor}"
        if shutil.which("redis-server") is None:
            return "needs redis-server (apt-get install redis-server)"
    if tier == "vm":
        from tests.vm.harness import missing_tools

        return missing_tools()
    if tier == "sandbox":
        from tests.sandbox.image import missing_tools as missing_sandbox_tools

        return missing_sandbox_tools()
    if tier == "mesh":
        # A gateway (integration), wireguard-go and nftables in namespaces (as the nat tier
        # needs them) and rootful podman (the sandbox tier's); its image is built on first use.
        return _missing_for("integration") or _missing_for("nat") or _missing_for("sandbox")
    if tier == "browser":
        if not os.path.exists("/usr/bin/chromium"):
            return "needs Debian's chromium at /usr/bin/chromium"
        try:
            import playwright  # noqa: F401
        except ImportError:
            return "needs the playwright Python package"
    return None


TIERS = ("postgres", "integration", "netns", "browser", "vm", "sandbox", "nat", "mesh", "faults")


def pytest_collection_modifyitems(config, items):
    # The ledger's state machine is the longest test of its pass (about 5 minutes at 200
    # examples on PostgreSQL). Run first, it overlaps the rest of the pass on the other xdist
    # worker; collected last (tests/property sorts after tests/db), it ran alone at the end.
    # A stable sort, the same in every worker, as xdist requires.
    items.sort(key=lambda item: item.get_closest_marker("property") is None)
    for item in items:
        for tier in TIERS:
            if item.get_closest_marker(tier) is None:
                continue
            reason = _missing_for(tier)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier skipped: {reason}"))


def pytest_sessionfinish(session, exitstatus):
    if not CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(
            f"CI=true: {len(skipped)} test(s) skipped; a skipped tier is a failure", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- personas ---------------------------------------------------------------------------


@pytest.fixture
def make_user(db, django_user_model):
    def make(username: str, **extra):
        return django_user_model.objects.create_user(
            username=username, password=f"{username}-pass-123", **extra
        )

    return make


@pytest.fixture
def buyer(make_user):
    return make_user("alice")


@pytest.fixture
def provider(make_user):
    return make_user("bob")


@pytest.fixture
def stranger(make_user):
    return make_user("mallory")


@pytest.fixture
def api_client_for():
    """An APIClient authenticated with a real API token of `user`: for a staff account, one
    issued with its second factor, as `auth/token/` issues staff tokens (ApiToken.staff_code;
    tests/db/test_staff_otp.py is where a token without it is refused staff powers)."""
    from rest_framework.test import APIClient

    from marketplace.tokens import issue_api_token

    def client_for(user):
        client = APIClient()
        token = issue_api_token(user, staff_code=user.is_staff)
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        return client

    return client_for


@pytest.fixture(autouse=True)
def _isolated_state_dir(settings, tmp_path_factory):
    """The gateway key lives in a per-session temporary state dir, never the developer's."""
    settings.MOLT_STATE_DIR = tmp_path_factory.getbasetemp() / "gateway-state"


# `make test` runs the CPU-bound tiers on both cores with pytest-xdist (scripts/run_tests.py).
# Each worker has a test database of its own (pytest-django names them per worker); what the
# workers would otherwise share in Redis is split here: the cache's db (cache.clear() flushes a
# whole db) and the channel layer's prefix (groups are named by row ids, which both workers'
# databases hand out from 1).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKER_INDEX = int(XDIST_WORKER.removeprefix("gw") or 0)
if WORKER_INDEX > 3:
    raise RuntimeError(f"{XDIST_WORKER}: at most 4 xdist workers (test cache: Redis dbs 6-9)")
CACHE_REDIS_DB = 9 - WORKER_INDEX


def pytest_configure(config):
    if XDIST_WORKER:
        from django.conf import settings

        layer = settings.CHANNEL_LAYERS["default"]
        if "CONFIG" in layer:
            layer["CONFIG"]["prefix"] = f"{layer['CONFIG'].get('prefix', 'molt')}-{XDIST_WORKER}"


@pytest.fixture(autouse=True)
def _own_cache_keys():
    """Each test gets cache keys of its own, on a Redis db that neither `make run` (db 0) nor the
    integration gateways (dbs 10-14) use: rate-limit counters never leak between tests. The
    cache is only reached by tests that use it (the db tier and up have Redis). An xdist worker
    has a db of its own (CACHE_REDIS_DB: 9, 8, ...)."""
    import uuid

    from django.test import override_settings

    cache = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"redis://127.0.0.1:6379/{CACHE_REDIS_DB}",
        "KEY_PREFIX": f"test-{uuid.uuid4().hex}",
    }
    with override_settings(CACHES={"default": cache}):
        yield
