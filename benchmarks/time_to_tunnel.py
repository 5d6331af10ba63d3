"""Time to tunnel: from `POST /api/v1/orders/` to the agent's acknowledgement and to the buyer's
first WireGuard handshake, over N sequential orders, beside a floor measured in the same run.

    .venv/bin/python benchmarks/time_to_tunnel.py [--orders 50]

(root; DATABASE_URL default postgres://postgres@127.0.0.1:5432/molt_bench_tunnel)

Real parts only, as in tests/netns/test_rental_e2e.py: PostgreSQL, Redis, uvicorn and a Celery
worker in the root namespace bound to the testbed bridge; `clawnode join` then `clawnode run`
(userspace backend: wireguard-go) in a provider namespace; a buyer namespace with a wireguard-go
interface configured with `wg`, a fresh `wg genkey` key per order.

Per order (sequential; one warm-up order first, reported apart):
- t0 = the wall clock just before the POST.
- ack: Order.running_since - t0. The gateway stamps running_since when it processes the agent's
  signed ACK (meshnet.agent_channel.acknowledge_revision), so the figure has no polling error.
  Also reported: when the buyer's side saw `running` (polling the database every 5 ms), and the
  split of the ack path: POST answered, order provisioned (the Celery task's transition row),
  acknowledged.
- first handshake: as soon as the order is seen running, the buyer does what the downloaded
  wireguard.conf says (`wg set` of the provider peer with endpoint, allowed IP and keepalive 25,
  `ip addr add` of the job address) and sends one UDP packet to the provider's mesh address; the
  handshake time is the buyer's `last_handshake_time_sec/nsec` read from its UAPI socket (the
  data `wg show IFACE latest-handshakes` prints, to the nanosecond instead of the second),
  polled every 1 ms. Figure: handshake - t0.
- then the order is stopped and the script waits for `completed` (the agent acknowledged the
  removal), so the listing's GPUs are free for the next order.

Floor (interleaved with the orders, same machine state): a second wireguard-go interface in the
provider namespace; `wg set IFACE peer BUYER_KEY allowed-ips JOB/32` (the peer the agent would
add) as a subprocess, then the buyer's same steps against it. Figures: the `wg set` alone, and
from before the `wg set` to the buyer's first handshake.

Prints one JSON object: p50/p95/p99/max per figure, the floor's, ratios p95 / floor p95, and
the target (p95 under 1 s) with met true/false. Exit status 0 when every order ran, else 1.

Everything is created for the run and removed after it, even on failure or SIGTERM: namespaces,
links, processes, the database (dropped; its name must start with `molt_bench`), the Redis
database (`REDIS_DB`, flushed) and the temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from tests.netns.testbed import Testbed  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/molt_bench_tunnel"
# Redis databases: 0 is `make run`'s, 10-14 the integration tests', 15 asgi_servers.py's.
REDIS_DB = 9
# RFC 2544's benchmarking range: never the tests' 198.51.100.0/24 bridge, so a netns test
# running at the same time keeps its routes.
BRIDGE_NET = "198.18.7"
TARGET_P95_S = 1.0
UAPI_DIR = Path("/var/run/wireguard")
PROVIDER_PORT = 51820
FLOOR_PORT = 51821
FLOOR_ADDRESS = "10.99.0.1"  # the floor interface's own address (stands for a mesh address)


# -- shared helpers (benchmarks/agent_footprint.py imports these) ------------------------------


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in seconds, reported in milliseconds."""
    if not samples_s:
        return {}
    if len(samples_s) == 1:
        value = round(samples_s[0] * 1000, 3)
        return {"n": 1, "p50_ms": value, "p95_ms": value, "p99_ms": value, "max_ms": value}
    cuts = statistics.quantiles(samples_s, n=100, method="inclusive")
    return {
        "n": len(samples_s),
        "p50_ms": round(cuts[49] * 1000, 3),
        "p95_ms": round(cuts[94] * 1000, 3),
        "p99_ms": round(cuts[98] * 1000, 3),
        "max_ms": round(max(samples_s) * 1000, 3),
        "mean_ms": round(statistics.fmean(samples_s) * 1000, 3),
    }


def ratio(a: dict[str, float], b: dict[str, float], key: str = "p95_ms") -> float | None:
    if not a or not b or not b.get(key):
        return None
    return round(a[key] / b[key], 2)


def _admin_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres")), parts.path.lstrip("/")


def check_bench_database(url: str) -> None:
    if not url.startswith(("postgres://", "postgresql://")):
        raise SystemExit("this benchmark needs PostgreSQL: set DATABASE_URL=postgres://...")
    _, name = _admin_url(url)
    if not name.startswith("molt_bench"):
        # The database is dropped at the end: never one that may hold real data.
        raise SystemExit(f"database {name!r} would be dropped: use a name starting molt_bench")


def fresh_database(url: str) -> None:
    """Drop and create the benchmark's database (its name was checked by check_bench_database)."""
    import psycopg
    from psycopg import sql

    admin, name = _admin_url(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    admin, name = _admin_url(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def flush_redis(db: int) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


def sigterm_raises() -> None:
    """SIGTERM becomes SystemExit, so the `finally` blocks clean up as for Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_on_a_fresh_database(
    run: Callable[[str, Path], tuple[dict[str, Any], bool]],
    *,
    default_url: str,
    redis_db: int,
    prefix: str,
) -> int:
    """The frame of a benchmark that runs a real gateway: a database created for the run
    (DATABASE_URL, else `default_url`; dropped after it, also on SIGTERM), its Redis db flushed
    before and after, a temporary folder; `run(database_url, tmp)` returns the figures, printed
    as JSON, and whether they are valid (the exit status)."""
    database_url = os.environ.get("DATABASE_URL", default_url)
    check_bench_database(database_url)
    sigterm_raises()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    ok = False
    try:
        fresh_database(database_url)
        flush_redis(redis_db)
        result, ok = run(database_url, tmp)
        print(json.dumps(result, indent=2))
    finally:
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        with contextlib.suppress(Exception):
            drop_database(database_url)
        with contextlib.suppress(Exception):
            flush_redis(redis_db)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, wireguard-go)")
    for tool in ("wireguard-go", "wg", "nft", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} on PATH")


def gateway_env(
    *, database_url: str, state_dir: Path, redis_db: int, host: str, tag: str
) -> dict[str, str]:
    """The environment of the gateway processes and of this process's Django (same database,
    same gateway key, same broker). Production-like: DEBUG off (no per-query log)."""
    redis_url = f"redis://127.0.0.1:6379/{redis_db}"
    return {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "MOLT_CHANNEL_PREFIX": f"molt-{tag}-{os.getpid()}",
        "MOLT_STATE_DIR": str(state_dir),
        "MOLT_ALLOW_SIMULATED_GPUS": "true",
        "ALLOWED_HOSTS": f"127.0.0.1,localhost,{host}",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, message: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


class BenchTestbed(Testbed):
    """tests/netns/testbed.py's Testbed on a bridge network of its own (see BRIDGE_NET)."""

    net: str = BRIDGE_NET

    @property
    def gateway_ip(self) -> str:
        return f"{self.net}.1"

    def attach(self, ns: str) -> str:
        host = self._next_host
        self._next_host += 1
        outside, inside = f"mv{host}o{self.suffix}"[:15], f"mv{host}i{self.suffix}"[:15]
        self.links.append(outside)
        self.exec_root("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self.exec_root("ip", "link", "set", outside, "master", self.bridge)
        self.exec_root("ip", "link", "set", outside, "up")
        self.exec_root("ip", "link", "set", inside, "netns", ns)
        address = f"{self.net}.{host}"
        self.exec_root("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        self.exec_root("ip", "-n", ns, "link", "set", inside, "up")
        return address

    @staticmethod
    def exec_root(*args: str) -> None:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def bench_testbed(net: str, tag: str) -> Iterator[BenchTestbed]:
    bed = BenchTestbed(suffix=f"{tag}{os.getpid() % 10000}")
    bed.net = net
    try:
        yield bed.up()
    finally:
        bed.down()


@dataclass
class Gateway:
    base_url: str
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115  (lives with the process)
        self.processes[name] = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{(self.log_dir / f'{name}.log').read_text()[-3000:]}"
            for name in self.processes
            if (self.log_dir / f"{name}.log").exists()
        )

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_gateway(env: dict[str, str], host: str, log_dir: Path) -> Iterator[Gateway]:
    """uvicorn (as Procfile.dev runs it) and a Celery worker, bound to `host`."""
    port = free_port(host)
    gw = Gateway(base_url=f"http://{host}:{port}", env={**os.environ, **env}, log_dir=log_dir)
    try:
        gw.start(
            "web",
            [str(BIN / "uvicorn"), "config.asgi:application", "--host", host, "--port",
             str(port), "--log-level", "warning", "--lifespan", "off"],
        )  # fmt: skip
        gw.start(
            "worker",
            [str(BIN / "celery"), "-A", "config", "worker", "-l", "warning", "--concurrency",
             "2", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--hostname", f"bench-{os.getpid()}@%h"],
        )  # fmt: skip

        def web_up() -> bool:
            try:
                url = gw.base_url + "/healthz/"  # http:// to our own gateway
                with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310
                    return r.status == 200
            except OSError:
                return False

        wait_until(web_up, timeout=40, interval=0.1, message="uvicorn to answer /healthz/")
        yield gw
    except BaseException:
        print(gw.logs(), file=sys.stderr)
        raise
    finally:
        gw.stop()


def call(base_url: str, method: str, path: str, token: str, body: dict | None = None):
    request = urllib.request.Request(  # noqa: S310  (http:// to our own gateway)
        base_url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def join_node(bed: Testbed, ns: str, *, gateway_url: str, token: str, state_dir: Path,
              iface: str, endpoint: str, gpus: str) -> tuple[str, str]:  # fmt: skip
    """`clawnode join` in `ns`; returns (node name, mesh address). --insecure: plain http to a
    gateway on the testbed's own bridge (state.check_transport refuses it otherwise)."""
    joined = bed.exec(
        ns, str(BIN / "clawnode"), "join", "--gateway", gateway_url, "--insecure", "--token", token,
        "--state-dir", str(state_dir), "--interface", iface, "--endpoint", endpoint,
        "--backend", "userspace", "--simulated-gpus", gpus, timeout=60,
    )  # fmt: skip
    match = re.search(r"(node-\d+) joined the mesh at (10\.100\.\d+\.\d+)", joined.stdout)
    if not match:
        raise RuntimeError(f"clawnode join said:\n{joined.stdout}{joined.stderr}")
    return match.group(1), match.group(2)


def start_agent(bed: Testbed, ns: str, state_dir: Path, gpus: str, log: Path) -> subprocess.Popen:
    """`clawnode run` in `ns` (`ip netns exec` execs it: the Popen's pid is the agent's)."""
    out = open(log, "ab")  # noqa: SIM115  (lives with the process)
    return bed.popen(
        ns, [str(BIN / "clawnode"), "run", "--state-dir", str(state_dir), "--simulated-gpus", gpus],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip


def start_wireguard_go(bed: Testbed, ns: str, iface: str, log_dir: Path) -> subprocess.Popen:
    """wireguard-go IFACE in the foreground in `ns`; returns once its UAPI socket answers."""
    out = open(log_dir / f"wireguard-go-{iface}.log", "ab")  # noqa: SIM115
    proc = bed.popen(
        ns, ["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", iface],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_until(lambda: uapi_alive(iface), timeout=10, interval=0.02, message=f"{iface} UAPI")
    return proc


def uapi(iface: str, request: str = "get=1\n\n") -> str:
    """One UAPI request to wireguard-go's socket (shared by all namespaces); the raw reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(UAPI_DIR / f"{iface}.sock"))
        sock.sendall(request.encode())
        reply = bytearray()
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


def uapi_alive(iface: str) -> bool:
    try:
        return "errno=0" in uapi(iface)
    except OSError:
        return False


def handshake_time(iface: str, peer_public_b64: str) -> float:
    """The peer's last handshake as Unix time (ns precision); 0.0 before the first."""
    import base64

    wanted = base64.b64decode(peer_public_b64).hex()
    current = ""
    sec = nsec = 0
    for line in uapi(iface).splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            if current == wanted:
                break
            current, sec, nsec = value, 0, 0
        elif current == wanted and key == "last_handshake_time_sec":
            sec = int(value)
        elif current == wanted and key == "last_handshake_time_nsec":
            nsec = int(value)
    if current != wanted:
        return 0.0
    return sec + nsec / 1e9 if sec else 0.0


def wg_keypair() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
    public = subprocess.run(
        ["wg", "pubkey"], input=private.stdout, capture_output=True, text=True, check=True
    )
    return private.stdout.strip(), public.stdout.strip()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of `pid` in KiB, from /proc/PID/status."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0])
    return out


def host_info() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "wireguard_go": subprocess.run(
            ["wireguard-go", "--version"], capture_output=True, text=True
        )
        .stdout.split("\n")[0]
        .strip(),
    }


# -- the buyer -------------------------------------------------------------------------------------

# A long-lived process in the buyer namespace that sends one UDP datagram per line read: "send one
# packet" without paying a process start per order.
SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin:
    s.sendto(b"x", (line.strip(), 9))
    print("sent", flush=True)
"""


class Buyer:
    """The buyer's namespace and its wireguard-go interface, configured with `wg` and `ip`."""

    def __init__(self, bed: Testbed, ns: str, iface: str, workdir: Path) -> None:
        self.bed, self.ns, self.iface, self.workdir = bed, ns, iface, workdir
        self.public_key = ""
        self.peers: list[str] = []
        self.sender = bed.popen(
            ns, [sys.executable, "-u", "-c", SENDER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def new_key(self) -> str:
        """A fresh key pair from `wg genkey` (not timed); old peers and addresses go."""
        for peer in self.peers:
            self.bed.exec(self.ns, "wg", "set", self.iface, "peer", peer, "remove")
        self.peers.clear()
        self.bed.exec(self.ns, "ip", "addr", "flush", "dev", self.iface)
        private, self.public_key = wg_keypair()
        key_file = self.workdir / "buyer.key"
        key_file.write_text(private + "\n")
        key_file.chmod(0o600)
        self.bed.exec(self.ns, "wg", "set", self.iface, "private-key", str(key_file))
        return self.public_key

    def connect(self, peer: str, endpoint: str, target: str, job_address: str) -> None:
        """What wireguard.conf says (peer, endpoint, AllowedIPs, keepalive 25, Address), then one
        packet to `target` through the tunnel."""
        self.peers.append(peer)
        self.bed.exec(
            self.ns, "wg", "set", self.iface, "peer", peer, "endpoint", endpoint,
            "allowed-ips", f"{target}/32", "persistent-keepalive", "25",
        )  # fmt: skip
        self.bed.exec(self.ns, "ip", "addr", "add", f"{job_address}/32", "dev", self.iface)
        self.bed.exec(self.ns, "ip", "route", "replace", f"{target}/32", "dev", self.iface)
        assert self.sender.stdin is not None and self.sender.stdout is not None
        self.sender.stdin.write(target + "\n")
        self.sender.stdin.flush()
        self.sender.stdout.readline()

    def first_handshake(self, peer: str, timeout: float = 20.0) -> float:
        """Poll the buyer's UAPI every 1 ms until the peer's first handshake; its Unix time."""
        return wait_until(
            lambda: handshake_time(self.iface, peer),
            timeout=timeout,
            interval=0.001,
            message=f"the buyer's handshake with {peer[:8]}",
        )


# -- the benchmark -------------------------------------------------------------------------------


def run(args: argparse.Namespace, database_url: str, tmp: Path) -> tuple[dict[str, Any], bool]:
    with bench_testbed(BRIDGE_NET, "t") as bed:
        prov, buyer_ns = bed.namespace("tp"), bed.namespace("tb")
        prov_ip = bed.attach(prov)
        bed.attach(buyer_ns)
        prov_if, floor_if, buyer_if = (bed.wireguard_name(r) for r in ("tp", "tf", "tb"))
        env = gateway_env(
            database_url=database_url, state_dir=tmp / "gateway-state", redis_db=REDIS_DB,
            host=bed.gateway_ip, tag="tunnel",
        )  # fmt: skip
        os.environ.update(env)
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from marketplace import ledger
        from marketplace.listings import create_listing
        from marketplace.models import Order, OrderTransition
        from marketplace.money import MICRO_PER_USD
        from marketplace.tokens import issue_api_token
        from meshnet.enrolment import create_enrollment_token
        from meshnet.models import Node

        call_command("migrate", verbosity=0)
        users = get_user_model().objects
        provider = users.create_user("bench-provider", password=secrets.token_urlsafe(16))
        buyer_user = users.create_user("bench-buyer", password=secrets.token_urlsafe(16))

        with running_gateway(env, bed.gateway_ip, tmp) as gateway:
            state_dir = tmp / "clawnode"
            gpus = "RTX 4090:2"
            name, mesh_ip = join_node(
                bed, prov, gateway_url=gateway.base_url,
                token=create_enrollment_token(provider).token, state_dir=state_dir,
                iface=prov_if, endpoint=f"{prov_ip}:{PROVIDER_PORT}", gpus=gpus,
            )  # fmt: skip
            node = Node.objects.get(name=name)
            agent = start_agent(bed, prov, state_dir, gpus, tmp / "agent.log")
            wait_until(
                lambda: Node.objects.get(pk=node.pk).online and node.gpus.exists(),
                timeout=30, message=f"the agent to connect\n{(tmp / 'agent.log').read_text()}",
            )  # fmt: skip
            listing = create_listing(
                provider, node=node, gpu_count=2, price_per_gpu_hour=MICRO_PER_USD,
                price_per_gib=100_000,
            )  # fmt: skip
            ledger.grant_credits(buyer_user, 10_000_000_000)
            token = issue_api_token(buyer_user)

            # The floor's provider side: wireguard-go beside the agent's, configured with wg.
            start_wireguard_go(bed, prov, floor_if, tmp)
            floor_private, floor_public = wg_keypair()
            (tmp / "floor.key").write_text(floor_private + "\n")
            (tmp / "floor.key").chmod(0o600)
            bed.exec(prov, "wg", "set", floor_if, "private-key", str(tmp / "floor.key"),
                     "listen-port", str(FLOOR_PORT))  # fmt: skip
            bed.exec(prov, "ip", "addr", "add", f"{FLOOR_ADDRESS}/32", "dev", floor_if)
            bed.exec(prov, "ip", "link", "set", floor_if, "up")

            start_wireguard_go(bed, buyer_ns, buyer_if, tmp)
            bed.exec(buyer_ns, "ip", "link", "set", buyer_if, "up")
            buyer = Buyer(bed, buyer_ns, buyer_if, tmp)

            def one_order() -> dict[str, float]:
                public = buyer.new_key()
                t0_wall = time.time()
                t0 = time.perf_counter()
                status, body = call(
                    gateway.base_url, "POST", "/api/v1/orders/", token,
                    {"listing": listing.pk, "gpu_count": 1, "hours": 1,
                     "wireguard_public_key": public},
                )  # fmt: skip
                posted = time.perf_counter() - t0
                if status != 201:
                    raise RuntimeError(f"POST /orders/ answered {status}: {body}")
                order_id = json.loads(body)["id"]
                rows = Order.objects.filter(pk=order_id)
                wait_until(
                    lambda: rows.values_list("state", flat=True).first()
                    in ("running", "failed", "cancelled"),
                    timeout=60, interval=0.005, message=f"order {order_id} to run",
                )  # fmt: skip
                seen = time.perf_counter() - t0
                order = rows.select_related("job_peer").get()
                if order.state != "running":
                    raise RuntimeError(f"order {order_id} is {order.state}: {order.reason}")
                buyer.connect(
                    node.wireguard_public_key, f"{prov_ip}:{PROVIDER_PORT}", mesh_ip,
                    order.job_peer.address,
                )  # fmt: skip
                connected = time.perf_counter() - t0
                handshake = buyer.first_handshake(node.wireguard_public_key) - t0_wall
                transitions = dict(
                    OrderTransition.objects.filter(order_id=order_id).values_list(
                        "to_state", "created_at"
                    )
                )
                # Stop and wait until the agent removed the peer: the GPU is free again.
                t_stop = time.perf_counter()
                status, body = call(
                    gateway.base_url, "POST", f"/api/v1/orders/{order_id}/stop/", token, {}
                )
                if status != 200:
                    raise RuntimeError(f"stop answered {status}: {body}")
                wait_until(
                    lambda: rows.values_list("state", flat=True).first() == "completed",
                    timeout=60, interval=0.005, message=f"order {order_id} to complete",
                )  # fmt: skip
                return {
                    "post_answered": posted,
                    "provisioned": transitions["provisioning"].timestamp() - t0_wall,
                    "ack": order.running_since.timestamp() - t0_wall,
                    "ack_recorded": transitions["running"].timestamp() - t0_wall,
                    "seen_running": seen,
                    "buyer_configured": connected,
                    "handshake": handshake,
                    "stop_to_completed": time.perf_counter() - t_stop,
                }

            def one_floor(i: int) -> dict[str, float]:
                public = buyer.new_key()
                job_address = f"10.98.{i // 250}.{i % 250 + 1}"
                t0_wall = time.time()
                t0 = time.perf_counter()
                bed.exec(prov, "wg", "set", floor_if, "peer", public, "allowed-ips",
                         f"{job_address}/32")  # fmt: skip
                wg_set = time.perf_counter() - t0
                buyer.connect(floor_public, f"{prov_ip}:{FLOOR_PORT}", FLOOR_ADDRESS, job_address)
                handshake = buyer.first_handshake(floor_public) - t0_wall
                bed.exec(prov, "wg", "set", floor_if, "peer", public, "remove")
                return {"wg_set": wg_set, "handshake": handshake}

            warmup = {"order": one_order(), "floor": one_floor(0)}
            orders: list[dict[str, float]] = []
            floors: list[dict[str, float]] = []
            failures: list[str] = []
            for i in range(args.orders):
                try:
                    orders.append(one_order())
                except (RuntimeError, TimeoutError) as exc:
                    failures.append(str(exc)[:300])
                    if len(failures) > 3:
                        raise
                floors.append(one_floor(i + 1))
            agent_rss = None
            with contextlib.suppress(OSError):
                agent_rss = proc_status(agent.pid)["VmRSS"]

    def column(rows: list[dict[str, float]], key: str) -> list[float]:
        return [row[key] for row in rows]

    ack = percentiles_ms(column(orders, "ack"))
    handshake = percentiles_ms(column(orders, "handshake"))
    floor_set = percentiles_ms(column(floors, "wg_set"))
    floor_handshake = percentiles_ms(column(floors, "handshake"))
    met_ack = bool(ack) and ack["p95_ms"] < TARGET_P95_S * 1000
    met_handshake = bool(handshake) and handshake["p95_ms"] < TARGET_P95_S * 1000
    steps = [
        ("post_answered", "POST /orders/ answered (201)"),
        ("provisioned", "Celery task allocated the job address (provisioning)"),
        ("ack", "gateway took the agent's ack (running_since)"),
        ("ack_recorded", "order marked running (its transition row, before commit)"),
        ("seen_running", "buyer's poll saw running"),
        ("buyer_configured", "buyer ran wg set + ip addr + sent one packet"),
        ("handshake", "buyer's first handshake"),
    ]
    result = {
        "benchmark": "time_to_tunnel",
        "host": host_info(),
        "orders": len(orders),
        "failed_orders": failures,
        "warmup_ms": {
            "order": {k: round(v * 1000, 1) for k, v in warmup["order"].items()},
            "floor": {k: round(v * 1000, 1) for k, v in warmup["floor"].items()},
        },
        "post_to_agent_ack": ack,
        "post_to_first_handshake": handshake,
        "floor": {
            "wg_set_subprocess": floor_set,
            "wg_set_to_first_handshake": floor_handshake,
        },
        "ratios_p95_over_floor_p95": {
            "agent_ack_over_wg_set": ratio(ack, floor_set),
            "first_handshake_over_floor_handshake": ratio(handshake, floor_handshake),
        },
        "target": {
            "p95_under_s": TARGET_P95_S,
            "post_to_agent_ack_met": met_ack,
            "post_to_first_handshake_met": met_handshake,
            "met": met_ack and met_handshake,
        },
        "timeline_from_post_p50_ms": {
            label: percentiles_ms(column(orders, key)).get("p50_ms") for key, label in steps
        },
        "timeline_from_post_p95_ms": {
            label: percentiles_ms(column(orders, key)).get("p95_ms") for key, label in steps
        },
        "stop_to_completed": percentiles_ms(column(orders, "stop_to_completed")),
        "agent_rss_kib_after_run": agent_rss,
    }
    return result, not failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=50, help="measured orders (default 50)")
    args = parser.parse_args()
    require_root_and_tools()
    return run_on_a_fresh_database(
        lambda database_url, tmp: run(args, database_url, tmp),
        default_url=DEFAULT_DATABASE_URL,
        redis_db=REDIS_DB,
        prefix="molt-bench-tunnel-",
    )


if __name__ == "__main__":
    sys.exit(main())
