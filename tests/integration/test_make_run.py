"""`make run`, the README's first command, as a person runs it: with no Redis answering it starts
its own, migrates a fresh SQLite database, seeds the demo market, and serves it with web, worker,
beat and the demo nodes' simulated agents (forced by MOLT_DEMO_AGENTS=simulated: the fallback of
machines that cannot run the real daemons, which tests/browser/test_make_run_first_order.py
runs; they bring the nodes online, so an order runs end to end); Ctrl-C stops every process it
started, the private Redis included."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.factories import wg_public_key
from tests.integration.conftest import free_port, wait_until

pytestmark = [pytest.mark.integration]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def call(base: str, method: str, path: str, body=None, token: str | None = None) -> dict:
    request = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc/*/stat: the fourth field)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            # The command name (second field) is in parentheses and may hold spaces.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
    return found


def processes_with(marker: str) -> list[str]:
    """Processes whose environment carries `marker` (everything this `make run` started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0"):
            found.append(f"{proc.name}: {cmdline}")
    return found


@dataclass
class MakeRun:
    """A `make run` started as a person starts it, in its own process group."""

    process: subprocess.Popen
    log_path: Path
    port: int
    redis_port: int
    marker: str  # in the environment of every process it started

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text()


@contextmanager
def start_make_run(tmp_path: Path, **extra_env: str) -> Iterator[MakeRun]:
    """`make run` on a fresh SQLite database and state under `tmp_path`, with a Redis port that
    nothing answers (so it starts its own), serving once the port listens; on the way out,
    Ctrl-C if it still runs, then SIGKILL for anything of it left."""
    port, redis_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        # The test process's own settings must not leak into the demo.
        if key not in {"CELERY_BROKER_URL", "DATABASE_URL", "DJANGO_DEBUG", "REDIS_URL"}
    }
    env |= {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp_path}/molt.sqlite3",
        # Nothing answers here: make run must start (and later stop) a redis-server of its own.
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "MOLT_STATE_DIR": str(tmp_path / "state"),
        "MOLT_DEMO_AGENTS_DIR": str(tmp_path / "demo-agents"),
        "MOLT_CHANNEL_PREFIX": f"makerun{port}",
        **extra_env,
    }
    log_path = tmp_path / "make-run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["make", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    run = MakeRun(process, log_path, port, redis_port, f"MOLT_CHANNEL_PREFIX=makerun{port}")
    try:
        wait_until(
            lambda: process.poll() is not None or listening(port),
            timeout=180,
            message="make run to serve",
        )
        assert process.poll() is None, f"make run exited early:\n{run.output()}"
        yield run
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for line in processes_with(run.marker):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def test_make_run_serves_the_demo_market_and_ctrl_c_stops_everything(tmp_path):
    # Beat's "Sending due task" lines (info) are the proof below that it runs.
    with start_make_run(tmp_path, CELERY_LOG_LEVEL="info", MOLT_DEMO_AGENTS="simulated") as run:
        make, log_path, base = run.process, run.log_path, run.base
        port, redis_port, marker = run.port, run.redis_port, run.marker
        output = log_path.read_text()
        assert "starting redis-server" in output
        assert "MOLT demo marketplace" in output
        # The fallback says what it is and why.
        assert "demo nodes: SIMULATED agents" in output
        assert "Not real daemons because MOLT_DEMO_AGENTS=simulated." in output
        assert "REAL clawnode" not in output

        with urllib.request.urlopen(f"{base}/healthz/", timeout=10) as response:
            assert response.status == 200
        # The credentials the banner printed work, and the demo market is there.
        username, password = re.search(r"(demo-buyer)\s+(\S+)", output).groups()
        token = call(
            base, "POST", "/api/v1/auth/token/", {"username": username, "password": password}
        )["token"]

        # The demo nodes' agents connect (signed auth, heartbeats): every listing is online,
        # listed without include_offline.
        def online_listings() -> list[dict]:
            return call(base, "GET", "/api/v1/listings/?limit=100", token=token)["results"]

        wait_until(
            lambda: len(online_listings()) == 10,
            timeout=90,
            message="the demo agents to bring all 10 listings online",
        )
        # The market page labels them: their tunnels move no packets.
        with urllib.request.urlopen(f"{base}/", timeout=10) as response:
            assert "their tunnels carry no traffic" in response.read().decode()
        # Each node's agent state is where seed_demo kept it: a private key, 0600.
        kept = sorted(p.parent.name for p in (tmp_path / "demo-agents").glob("*/identity.key"))
        assert len(kept) == 9, kept
        for key in (tmp_path / "demo-agents").glob("*/identity.key"):
            assert key.stat().st_mode & 0o777 == 0o600
        # The worker and an agent are up: an order placed through the API is provisioned by the
        # worker, its peer applied and acknowledged by the node's agent, and it runs.
        listing = online_listings()[0]
        order = call(
            base,
            "POST",
            "/api/v1/orders/",
            {
                "listing": listing["id"],
                "gpu_count": 1,
                "hours": 1,
                "wireguard_public_key": wg_public_key(),
            },
            token=token,
        )
        wait_until(
            lambda: (
                call(base, "GET", f"/api/v1/orders/{order['id']}/", token=token)["state"]
                == "running"
            ),
            timeout=90,
            message="the order to run on a demo node",
        )
        running = call(base, "GET", f"/api/v1/orders/{order['id']}/", token=token)
        # How to connect: the buyer's tunnel address and the node's key and endpoint.
        assert running["job_address"] and running["provider_public_key"], running
        assert running["endpoint"], running
        # Beat is up: it sends its schedule (expire-orders every 15 s).
        wait_until(
            lambda: "Sending due task expire-orders" in log_path.read_text(),
            timeout=60,
            message="beat to send a due task",
        )

        # A worker that dies on its own (the OOM killer, a stray kill -9) is started again, and
        # takes neither web nor beat down with it (honcho stops everything when one process
        # exits: scripts/respawn.py keeps it from seeing that).
        # The worker is respawn.py's child (celery retitles itself, so its command line and
        # environment no longer carry the marker).
        (respawn,) = [line for line in processes_with(marker) if "respawn.py worker" in line]
        (worker,) = children_of(int(respawn.split(":", 1)[0]))
        os.kill(worker, signal.SIGKILL)
        wait_until(
            lambda: "[respawn] worker exited on its own (rc=-9)" in log_path.read_text(),
            timeout=30,
            message="respawn to notice the killed worker",
        )
        wait_until(
            lambda: children_of(int(respawn.split(":", 1)[0])) not in ([], [worker]),
            timeout=60,
            message="a new worker process",
        )
        assert make.poll() is None, log_path.read_text()[-3000:]
        with urllib.request.urlopen(f"{base}/healthz/", timeout=10) as response:
            assert response.status == 200

        # Ctrl-C: the terminal sends SIGINT to the foreground process group.
        os.killpg(make.pid, signal.SIGINT)
        # make itself dies of the SIGINT once its recipe has ended (GNU make re-raises it).
        assert make.wait(timeout=60) in (0, -signal.SIGINT), log_path.read_text()[-3000:]
        wait_until(lambda: not processes_with(marker), timeout=15, message="every process to end")
        assert not listening(port)
        assert not listening(redis_port), "the private redis-server was left running"
        output = log_path.read_text()
        assert "stopping the redis-server make run started" in output
        assert "Traceback" not in output
        assert "SIMULATED" in output
        assert "demo agents: stopped" in output
        for process in ("web", "worker", "beat", "agents"):
            assert re.search(rf"{process}\.1 stopped \(rc=(0|-15)\)", output), process
