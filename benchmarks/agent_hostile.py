"""Hostile senders on the agents' websocket: what they cost one real web process.

    .venv/bin/python benchmarks/agent_hostile.py [--seconds 60] [--quiet-seconds 15]

(DATABASE_URL default postgres://postgres@127.0.0.1:5432/molt_bench_hostile, dropped and made
afresh; REDIS_URL default redis://127.0.0.1:6379/14, MOLT_CHANNEL_PREFIX molt-bench-hostile)

One uvicorn web process, started with Procfile.dev's web line (as `make run` starts it: its
--ws-max-size included), on PostgreSQL and Redis. Two nodes are enrolled for the senders that
authenticate. Then:

1. quiet: GET /healthz/ ten times a second for --quiet-seconds, nothing else; the web
   process's RSS at the end is the baseline;
2. attack: 16 senders for --seconds, each from its own loopback address (127.0.1.N: a
   distributed attacker, so the per-address caps alone do not save the gateway), in a
   separate process, while /healthz/ is sampled as in 1 and the web RSS every 0.5 s:
   - 3 senders of 1 MiB text frames before auth (the most the server reads),
   - 2 senders of 16 MiB frames before auth (refused by the server on the frame header),
   - 3 senders of binary frames (64 KiB),
   - 3 senders of JSON nested 1,500 and 100,000 deep,
   - 3 connection floods: up to 300 unauthenticated sockets each, opened as fast as they
     are closed (the unauthenticated cap and the 10 s auth timeout close them),
   - 2 enrolled nodes flooding after auth: heartbeats, and signed metering samples;
   each reconnects as soon as it is closed, and counts the close codes it got;
3. after: 5 s settle, RSS again.

Prints one JSON object: `rss_mb` {quiet, peak, end}, `rss_growth_mb` (peak - quiet),
`healthz_ms` {quiet, attack} with p50/p95/p99, `healthz_p95_ratio` (attack / quiet), the
senders' close codes and frames sent, and the machine. Goals (docs/operations.md): growth under
50 MB, p95 ratio under 3. Nothing is asserted; the exit status is 0 unless the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/molt_bench_hostile")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("MOLT_CHANNEL_PREFIX", "molt-bench-hostile")
os.environ.setdefault("CELERY_BROKER_URL", "memory://")

MIX = (
    ["big_1mib"] * 3
    + ["big_16mib"] * 2
    + ["binary"] * 3
    + ["deep_json"] * 3
    + ["conn_flood"] * 3
    + ["auth_heartbeat_flood", "auth_metering_flood"]
)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples) or [float("nan")]

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"n": len(samples), "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": at(1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fresh_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if name == "molt":
        raise SystemExit("refusing to use the database `molt`: give the benchmark its own")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def web_command() -> str:
    for line in (REPO / "Procfile.dev").read_text().splitlines():
        if line.startswith("web:"):
            return line.removeprefix("web:").strip()
    raise SystemExit("Procfile.dev has no web line")


# -- the senders (in their own process) --------------------------------------------------------


async def sender(
    kind: str, index: int, url: str, stop_at: float, seeds: dict, flood_rate: float, out: dict
) -> None:
    import websockets
    from clawnode import frames
    from clawnode.journal import EpochJournal
    from clawnode.keys import Identity
    from clawnode.metering import Meter

    source = (f"127.0.1.{index + 1}", 0)
    codes: Counter[str] = Counter()
    sent = 0
    identity = Identity.from_seed(bytes.fromhex(seeds[kind])) if kind in seeds else None
    meter = None
    if kind == "auth_metering_flood":
        meter = Meter(identity, EpochJournal(Path(tempfile.mkdtemp(prefix="molt-hostile-"))))
    payloads = {
        "big_1mib": "x" * ((1 << 20) - 64),
        "big_16mib": "x" * (16 << 20),
        "binary": b"\x00" * 65536,
    }

    async def one_socket() -> None:
        nonlocal sent
        async with websockets.connect(
            url, local_addr=source, max_size=None, open_timeout=10, ping_interval=None
        ) as ws:
            challenge = json.loads(await ws.recv())
            if kind in payloads:
                while time.monotonic() < stop_at:
                    await ws.send(payloads[kind])
                    sent += 1
                    await asyncio.sleep(0)  # a send that does not block must not starve the rest
            elif kind == "deep_json":
                depth = 1500 if sent % 2 else 100_000
                await ws.send("[" * depth + "]" * depth)
                sent += 1
            else:  # an enrolled node flooding after auth
                await ws.send(json.dumps(frames.auth(identity, challenge["challenge"])))
                while time.monotonic() < stop_at:
                    if meter is not None:
                        frame = frames.metering(meter.sample({}))
                    else:
                        frame = {"type": "heartbeat"}
                    await ws.send(json.dumps(frame))
                    sent += 1
                    await asyncio.sleep(0)
            await asyncio.wait_for(ws.wait_closed(), max(0.1, stop_at - time.monotonic()))
            codes[str(ws.close_code)] += 1

    async def flood() -> None:
        open_: set[asyncio.Task] = set()

        async def hold() -> None:
            nonlocal sent
            try:
                async with websockets.connect(
                    url, local_addr=source, open_timeout=10, ping_interval=None
                ) as ws:
                    sent += 1
                    await asyncio.wait_for(ws.wait_closed(), max(0.1, stop_at - time.monotonic()))
                    code = ws.close_code
                    codes[str(code)] += 1
            except Exception as exc:  # counted: a refused or reset connect is the point
                codes[type(exc).__name__] += 1

        gap = 1 / flood_rate if flood_rate > 0 else 0.0
        while time.monotonic() < stop_at:
            while len(open_) < 300 and time.monotonic() < stop_at:
                task = asyncio.ensure_future(hold())
                open_.add(task)
                task.add_done_callback(open_.discard)
                await asyncio.sleep(gap)
            await asyncio.sleep(0.01)
        for task in list(open_):
            task.cancel()

    if kind == "conn_flood":
        await flood()
    else:
        while time.monotonic() < stop_at:
            try:
                await one_socket()
            except websockets.ConnectionClosed as exc:
                codes[str(exc.rcvd.code if exc.rcvd else None)] += 1
            except TimeoutError:
                codes["timeout"] += 1
            except (OSError, websockets.WebSocketException) as exc:
                codes[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
    out[f"{kind}#{index}"] = {"sent": sent, "closes": dict(codes)}


def attack(url: str, seconds: float, seeds: dict, mix: list[str], flood_rate: float, queue) -> None:
    # On the lowest CPU priority: on a real gateway the attackers run on other machines; here
    # they share its cores, and at equal priority the figure would be mostly their own load.
    os.nice(19)
    import django

    django.setup()

    async def main() -> dict:
        stop_at = time.monotonic() + seconds
        out: dict = {}
        await asyncio.gather(
            *(sender(kind, i, url, stop_at, seeds, flood_rate, out) for i, kind in enumerate(mix))
        )
        return out

    queue.put(asyncio.run(main()))


# -- the measurer ------------------------------------------------------------------------------


def sample_healthz(port: int, stop: threading.Event, into: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/healthz/")
            if conn.getresponse().status == 200:
                into.append(time.perf_counter() - start)
            conn.close()
        except OSError:
            into.append(30.0)  # a failed probe counts as the worst
        stop.wait(max(0.0, 0.1 - (time.perf_counter() - start)))


def sample_rss(pid: int, stop: threading.Event, into: list[float]) -> None:
    while not stop.is_set():
        into.append(rss_mb(pid))
        stop.wait(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--quiet-seconds", type=float, default=15)
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=50,
        help="new sockets a second per connection-flood sender; 0: as fast as they close",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated sender kinds to keep (a diagnosis aid)"
    )
    args = parser.parse_args()
    mix = [kind for kind in MIX if not args.only or kind in args.only.split(",")]

    fresh_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    from clawnode.keys import Identity
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from meshnet.enrolment import create_enrollment_token, enroll_node
    from tests.factories import enroll_request, gpu

    call_command("migrate", verbosity=0)
    import redis

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    owner = get_user_model().objects.create_user("hostile-owner", password=None)
    seeds = {}
    for kind in ("auth_heartbeat_flood", "auth_metering_flood"):
        seed = os.urandom(32)  # the senders' process signs as this node
        request = enroll_request(
            Identity.from_seed(seed), create_enrollment_token(owner).token, gpus=[gpu(0)]
        )
        enroll_node(request, observed_ip=None)
        seeds[kind] = seed.hex()

    tmp = Path(tempfile.mkdtemp(prefix="molt-hostile-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",  # the virtualenv's uvicorn
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MOLT_STATE_DIR": str(tmp / "state"),
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }
    log = open(tmp / "web.log", "w")  # noqa: SIM115  (closed at exit)
    web = subprocess.Popen(
        ["bash", "-c", web_command()], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/healthz/")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or web.poll() is not None:
                raise SystemExit((tmp / "web.log").read_text()[-3000:])
            time.sleep(0.2)

        load_before = os.getloadavg()[0]
        quiet: list[float] = []
        stop = threading.Event()
        probe = threading.Thread(target=sample_healthz, args=(port, stop, quiet))
        probe.start()
        time.sleep(args.quiet_seconds)
        stop.set()
        probe.join()
        rss_quiet = rss_mb(web.pid)

        under: list[float] = []
        rss: list[float] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=sample_healthz, args=(port, stop, under)),
            threading.Thread(target=sample_rss, args=(web.pid, stop, rss)),
        ]
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, no Django state
        queue = spawn.Queue()
        attacker = spawn.Process(
            target=attack,
            args=(
                f"ws://127.0.0.1:{port}/ws/agent/",
                args.seconds,
                seeds,
                mix,
                args.flood_rate,
                queue,
            ),
        )
        cpu_before = cpu_s(web.pid)
        attacker.start()
        for thread in threads:
            thread.start()
        senders = queue.get(timeout=args.seconds + 120)
        attacker.join(30)
        web_cpu = cpu_s(web.pid) - cpu_before
        load_after = os.getloadavg()[0]
        stop.set()
        for thread in threads:
            thread.join()
        time.sleep(5)
        rss_end = rss_mb(web.pid)
        errors = [
            line for line in (tmp / "web.log").read_text().splitlines() if "Traceback" in line
        ]
    finally:
        if web.poll() is None:
            os.killpg(web.pid, signal.SIGTERM)
            web.wait(15)

    quiet_p, under_p = percentiles(quiet), percentiles(under)
    peak = max(rss) if rss else rss_quiet
    totals: Counter[str] = Counter()
    for result in senders.values():
        totals.update(result["closes"])
    result = {
        "what": "16 hostile senders on /ws/agent/ against one uvicorn web process",
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or _cpu_model(),
            "python": platform.python_version(),
            # Other work on the machine: the 1-minute load average before the quiet phase and
            # at the end of the attack (the attackers themselves are one process, at nice 19).
            "loadavg_1m": [round(load_before, 1), round(load_after, 1)],
        },
        "web_command": web_command(),
        "senders_run": len(mix),
        "seconds": args.seconds,
        "quiet_seconds": args.quiet_seconds,
        "rss_mb": {"quiet": round(rss_quiet, 1), "peak": round(peak, 1), "end": round(rss_end, 1)},
        "rss_growth_mb": round(peak - rss_quiet, 1),
        "healthz_ms": {"quiet": quiet_p, "attack": under_p},
        "healthz_p95_ratio": round(under_p["p95"] / quiet_p["p95"], 2),
        "close_codes": dict(totals),
        "web_cpu_s": round(web_cpu, 1),
        "web_cpu_ms_per_closed_socket": round(
            1000 * web_cpu / max(1, sum(v for k, v in totals.items() if k.isdigit())), 2
        ),
        "senders": senders,
        "web_tracebacks": len(errors),
    }
    result["goals_met"] = {
        "rss_growth_under_50_mb": result["rss_growth_mb"] < 50,
        "healthz_p95_under_3x_quiet": result["healthz_p95_ratio"] < 3,
    }
    print(json.dumps(result, indent=2))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
