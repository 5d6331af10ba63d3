"""A real gateway for integration tests: uvicorn (ASGI) and a Celery worker as separate
processes, Redis as broker and channel layer, the test's PostgreSQL database."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.db import connection

from tests.conftest import REPO
from tests.ports import unused_port

BIN = Path(sys.executable).parent


def free_port() -> int:
    return unused_port()


def database_url() -> str:
    """The URL of the database this test runs on (pytest-django's test database)."""
    s = connection.settings_dict
    user = s.get("USER") or "postgres"
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{s['NAME']}"


@dataclass
class Gateway:
    base_url: str
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def logs(self) -> str:
        parts = []
        for name in self.processes:
            path = self.log_dir / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text()[-4000:]}")
        return "\n".join(parts)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_until(predicate, *, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@contextlib.contextmanager
def own_redis_db() -> Iterator[int]:
    """A Redis database index (10-13; the benchmarks take 14 and 15) that no other test session
    on this machine uses meanwhile: the gateway flushes it, so two sessions on one index (the
    old `10 + pid % 5`) could drop each other's queued tasks. An flock per index, held while
    the gateway runs, decides."""
    for index in range(10, 14):
        lock = open(f"/tmp/molt-test-redis-db-{index}.lock", "w")  # noqa: SIM115 (held below)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            yield index
        finally:
            lock.close()
        return
    raise RuntimeError("Redis databases 10-13 are all taken by other test sessions")


@contextlib.contextmanager
def running_gateway(
    tmp_path: Path,
    settings,
    host: str = "127.0.0.1",
    *,
    redis_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """uvicorn + Celery worker on the test database, bound to `host`, with a Redis database and
    channel prefix of their own so no other process on this machine takes their tasks.
    `redis_url` puts broker, channel layer and cache on another Redis (the faults tier's own
    redis-server, which it stops and restarts); `extra_env` sets or overrides settings."""
    port = free_port()
    with contextlib.ExitStack() as held:
        if redis_url is None:
            redis_url = f"redis://127.0.0.1:6379/{held.enter_context(own_redis_db())}"
        yield from _running_gateway(tmp_path, settings, host, port, redis_url, extra_env)


def _running_gateway(tmp_path, settings, host, port, redis_url, extra_env) -> Iterator[Gateway]:
    env = {
        **os.environ,
        "DJANGO_DEBUG": "true",
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "MOLT_CHANNEL_PREFIX": f"molt-test-{os.getpid()}",
        "MOLT_STATE_DIR": str(tmp_path / "gateway-state"),
        "MOLT_ALLOW_SIMULATED_GPUS": "true",
        # test_agent_daemon's agents send every half second, ten times clawnode's periods.
        "MOLT_AGENT_RATE_FACTOR": "10",
        "ALLOWED_HOSTS": f"127.0.0.1,localhost,{host}",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    # In-process services (signing, enrolment in test set-up) use the server's gateway key.
    settings.MOLT_STATE_DIR = env["MOLT_STATE_DIR"]
    subprocess.run(
        [str(BIN / "python"), "-c", f"import redis; redis.Redis.from_url({redis_url!r}).flushdb()"],
        check=True,
    )
    gw = Gateway(base_url=f"http://{host}:{port}", env=env, log_dir=tmp_path)
    gw.start(
        "web",
        [str(BIN / "uvicorn"), "config.asgi:application", "--host", host, "--port", str(port),
         "--log-level", "warning", "--ws-max-size", "1048576", "--ws-per-message-deflate",
         "false"],
    )  # fmt: skip
    gw.start(
        "worker",
        [str(BIN / "celery"), "-A", "config", "worker", "-l", "info", "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--hostname", f"test-{os.getpid()}@%h"],
    )  # fmt: skip

    def web_up():
        try:
            with urllib.request.urlopen(gw.base_url + "/healthz/", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(web_up, timeout=30, message="uvicorn to answer /healthz/")
        yield gw
    except BaseException:
        print(gw.logs())
        raise
    finally:
        for name in list(gw.processes):
            gw.stop(name)


@pytest.fixture
def gateway(transactional_db, tmp_path, settings) -> Iterator[Gateway]:
    with running_gateway(tmp_path, settings) as gw:
        yield gw
