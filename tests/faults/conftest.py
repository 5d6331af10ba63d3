"""The faults tier: a real gateway (uvicorn + Celery worker) on a redis-server of its own, real
clawnode agents (in-memory WireGuard), and a client that records every answer it got. Each
test breaks one thing mid-flow, repairs it, runs the sweeps beat would run, and then checks
the same invariants (`assert_recovered`):

- no order is left in a transitional state (pending, provisioning, stopping); a running order
  runs justly: its node is online, its time is not up, its hold open and its peer on the node;
- every hold of an ended order is resolved exactly once, and one that ran is settled once;
- `manage.py audit_ledger` exits 0;
- no write the client sent was answered 5xx.

The Redis here is this tier's own `redis-server` on a free port: the machine's shared one is
never stopped. PostgreSQL backends are terminated only in the test database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent
from clawnode.firewall import FakeFirewall
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity
from clawnode.state import Enrollment, StateDir
from django.conf import settings as django_settings
from django.utils import timezone

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, LedgerTransaction, Listing, Order, Settlement
from marketplace.tokens import issue_api_token
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.gateway_key import gateway_identity
from meshnet.models import JobPeer, Node
from tests.conftest import REPO
from tests.factories import USD, enroll_request, gpu
from tests.integration.conftest import Gateway, free_port, running_gateway, wait_until
from tests.integration.test_agent_daemon import FAST
from tests.integration.test_crash_safety import send, wait_for_worker

BIN = Path(sys.executable).parent

# What beat would send after an outage, in an order that lets each step see the last one's
# work: pending orders provisioned, lagging nodes re-pushed, ended orders settled.
SWEEPS = (
    "marketplace.tasks.sweep_pending_orders",
    "meshnet.tasks.repush_lagging_nodes",
    "marketplace.tasks.expire_orders",
    "marketplace.tasks.sweep_settlements",
)
TRANSITIONAL = (Order.State.PENDING, Order.State.PROVISIONING, Order.State.STOPPING)


# --- this tier's own Redis ------------------------------------------------------------------


class RedisServer:
    """A redis-server in the foreground (its pid held here), no persistence: a restart loses
    every queued message and channel-layer group, as a real crash of an ephemeral broker does."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self.answers, timeout=10, message="the tier's redis-server to answer")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL by default: the broker dies, nothing is flushed or handed over."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        wait_until(lambda: not self.answers(), timeout=5, message="redis-server to stop")


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_gateway(transactional_db, tmp_path, settings, redis_server, monkeypatch):
    """Start the gateway on the tier's Redis; `extra_env` overrides settings for one test."""
    # Unacknowledged messages of a killed worker come back after 3 s, not an hour.
    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT_SECONDS", "3")
    with contextlib.ExitStack() as stack:

        def start(**extra_env: str) -> Gateway:
            gw = stack.enter_context(
                running_gateway(tmp_path, settings, redis_url=redis_server.url, extra_env=extra_env)
            )
            wait_for_worker(gw, "worker")
            return gw

        yield start


# --- a client that remembers what it was told -----------------------------------------------


@dataclass
class Client:
    """One API user over HTTP. Every write's answer is kept, so a test can prove that no
    write was answered 5xx (the rule of the tier: a committed write never is)."""

    base_url: str
    token: str
    writes: list[tuple[str, str, int, str]] = field(default_factory=list)

    def request(self, method: str, path: str, body: dict | None = None, **headers: str):
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                **headers,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        if method != "GET":
            self.writes.append((method, path, status, text[:300]))
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def order(self, listing_id: int, key: str, **headers: str):
        body = {"listing": listing_id, "gpu_count": 1, "hours": 1, "wireguard_public_key": key}
        return self.request("POST", "/api/v1/orders/", body, **headers)

    def server_errors(self) -> list[tuple[str, str, int, str]]:
        return [w for w in self.writes if w[2] >= 500]


# --- agents ---------------------------------------------------------------------------------


@dataclass
class ProviderNode:
    node: Node
    agent: Agent
    backend: FakeBackend


def enrolled_agent(
    provider, gateway: Gateway, workdir: Path, *, websocket_base: str | None = None
) -> ProviderNode:
    """A node enrolled in-process and the real daemon for it (in-memory WireGuard, the one
    stand-in of the live tiers), talking to `websocket_base` (default: the gateway itself)."""
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        enroll_request(identity, issued.token, gpus=[gpu(i, simulated=True) for i in range(4)]),
        observed_ip="203.0.113.7",
    ).node
    state = StateDir(workdir / f"clawnode-{node.pk}")
    identity.save(state.identity_path)
    base = websocket_base or gateway.base_url
    enrollment = Enrollment(
        gateway=gateway.base_url,
        node_id=node.node_id,
        name=node.name,
        mesh_address=node.mesh_address,
        gateway_public_key=gateway_identity().public_key_b64,
        websocket_url=base.replace("http://", "ws://") + "/ws/agent/",
        interface="molt0",
        backend="userspace",
    )
    state.save_enrollment(enrollment)
    backend = FakeBackend()
    agent = Agent(
        state=state,
        enrollment=enrollment,
        identity=identity,
        backend=backend,
        firewall=FakeFirewall(),
        gpus=SimulatedGpuReader("RTX 4090:4"),
        timing=FAST,
        say=lambda line: None,
    )
    return ProviderNode(node=node, agent=agent, backend=backend)


def fault_market(
    gateway: Gateway,
    provider,
    buyer,
    workdir: Path,
    *,
    credits: int = 100 * USD,
    price_per_gib: int = 0,
    websocket_base: str | None = None,
) -> tuple[ProviderNode, Listing, Client]:
    """What every fault test starts from: the provider's node with its real daemon
    (enrolled_agent, not yet running), a listing of its 4 GPUs at $1 per GPU-hour, and the buyer
    with `credits` and an API client of the gateway."""
    provider_node = enrolled_agent(provider, gateway, workdir, websocket_base=websocket_base)
    listing = create_listing(
        provider,
        node=provider_node.node,
        gpu_count=4,
        price_per_gpu_hour=USD,
        price_per_gib=price_per_gib,
    )
    ledger.grant_credits(buyer, credits)
    return provider_node, listing, Client(gateway.base_url, issue_api_token(buyer))


# --- recovery and its invariants ------------------------------------------------------------


def run_sweeps(gateway: Gateway, rounds: int = 2, worker: str = "worker") -> None:
    """Send beat's sweeps to the worker (as beat would, without its 15-60 s periods) and wait
    until `worker` has run each; `rounds` times, since one sweep's work feeds the next."""
    log = gateway.log_dir / f"{worker}.log"

    def finished(task: str) -> int:
        return len(re.findall(rf"Task {re.escape(task)}\[[0-9a-f-]+\] succeeded", log.read_text()))

    for _ in range(rounds):
        before = {task: finished(task) for task in SWEEPS}
        for task in SWEEPS:
            send(gateway, task)
        wait_until(
            lambda before=before: all(finished(t) > n for t, n in before.items()),
            timeout=60,
            message=f"the worker to run the sweeps\n{gateway.logs()}",
        )


def audit_ok(gateway: Gateway) -> None:
    """`manage.py audit_ledger`, as an operator runs it, against the gateway's database."""
    result = subprocess.run(
        [str(BIN / "python"), "manage.py", "audit_ledger"],
        cwd=REPO,
        env=gateway.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def assert_recovered(gateway: Gateway, clients: list[Client], nodes: list[ProviderNode]) -> None:
    """The tier's invariants, after the fault is repaired and the sweeps ran."""
    errors = [error for client in clients for error in client.server_errors()]
    assert errors == [], f"writes answered 5xx: {errors}"
    now = timezone.now()
    online_after = now - timedelta(seconds=django_settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
    for order in Order.objects.select_related("hold", "listing__node", "job_peer"):
        where = f"order {order.pk} ({order.state}, reason {order.reason!r})"
        assert order.state not in TRANSITIONAL, f"{where} is stuck"
        hold = EscrowHold.objects.get(order=order)
        resolutions = LedgerTransaction.objects.filter(resolves_hold=hold).count()
        if order.state == Order.State.RUNNING:
            node = order.listing.node
            assert node.last_seen_at and node.last_seen_at >= online_after, f"{where}: node lost"
            assert order.ends_at > now, f"{where}: its time is up"
            assert hold.state == EscrowHold.State.OPEN and resolutions == 0, where
            assert order.job_peer.state == JobPeer.State.ACTIVE, where
        else:
            assert hold.state != EscrowHold.State.OPEN, f"{where}: hold still open"
            assert resolutions == 1, f"{where}: hold resolved {resolutions} times"
            ran = order.running_since is not None
            assert Settlement.objects.filter(order=order).count() == (1 if ran else 0), where
            if order.job_peer_id:
                assert order.job_peer.state != JobPeer.State.ACTIVE, f"{where}: peer still on"
    # Every agent converged: its device holds exactly the peers of its node's running orders.
    for provider_node in nodes:
        wanted = set(
            Order.objects.filter(
                listing__node=provider_node.node, state=Order.State.RUNNING
            ).values_list("wireguard_public_key", flat=True)
        )
        wait_until(
            lambda pn=provider_node, wanted=wanted: set(pn.backend.peers) == wanted,
            timeout=30,
            message=f"node {provider_node.node.pk}'s device to hold exactly {wanted}",
        )
    audit_ok(gateway)


# --- a network path that can be cut -------------------------------------------------------


class Partition:
    """A TCP relay between agents and the gateway that can be cut like a network partition:
    while cut, nothing is forwarded either way and nothing is closed (no FIN, no RST), so both
    ends see silence, as when a link or a NAT drops packets. New connections are accepted and
    held silent too. Healing forwards whatever waited in the kernel's buffers."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.closing = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.closing = True
        self.open.set()
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                self.open.wait()
                if self.closing:
                    return
                source.settimeout(0.1)
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                self.open.wait()  # cut while this was in flight: it waits with the rest
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def backend_pid() -> int:
    """This thread's PostgreSQL backend (Django keeps a connection per thread)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def pg_terminate_test_backends(spare: tuple[int, ...] = ()) -> int:
    """Terminate every backend of the test database but this thread's own and `spare` (never
    another database's: the server is shared). Returns how many were terminated."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND NOT (pid = ANY(%s))",
            [list(spare)],
        )
        return cursor.fetchone()[0]


def gateway_port(gateway: Gateway) -> int:
    return int(gateway.base_url.rsplit(":", 1)[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pause(seconds: float) -> None:
    """Let time pass for the gateway and agents (a fault's duration), never asserted."""
    time.sleep(seconds)
