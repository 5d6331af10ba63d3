"""The agent plane at scale (issue 14): N agents on one gateway web process.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/molt_bench_plane \\
    .venv/bin/python benchmarks/agent_plane.py --n 100 500 1000 2000 [--idle 20] [--reps 1]

One uvicorn process (config.asgi, DEBUG off, no per-message deflate: as the gateway runs) on a
fresh PostgreSQL database and Redis, and N lightweight simulated agents in this process speaking
the real signed protocol: websocket connect, the challenge answered with a signed AGENT_AUTH,
then at the real agent's default periods (clawnode.daemon.Timing) a heartbeat every 5 s, a
signed metering sample every 10 s (no peers: an idle node) and the inventory every 60 s (phases
spread at random), and a signed ACK of every desired state pushed (the simulated agent does not
check the gateway's signature, which a real one does: client CPU only). Per N:

- connect_burst_s: all N connect at once; until every one is welcomed and has its state.
- idle_cpu_core_fraction: the web process's CPU time over an --idle window of that traffic,
  per second of wall time (1.0 = one core busy).
- rss_kib_per_agent: the web process's VmRSS after the idle window less before any agent
  connected, per agent.
- change_to_all_acked_ms {p50, p95, max}: every node's desired revision bumped and
  meshnet.tasks.push_desired_states run on all of them (here, as a worker would), until each
  node's acked_revision in the database has it (polled every 20 ms; per node the first poll
  that saw it); "all_acked_ms" is the last. "pushed_ms": when push_desired_states returned
  (the worker's share, run in this process beside the simulated agents; with --worker-process
  the bump and the push run in a process of their own, as a Celery worker runs them, while
  this one polls).

The floor, in the same run: a bare ASGI websocket app under the same uvicorn doing the same
handshake (challenge, signature checked against the node's key), ignoring heartbeats,
metering and inventory, and on a change sending each socket a revision and noting each ack's
arrival. Same N, same agents, same measures.

--gateway-src DIR runs the web process from another checkout of the code (git archive of an
earlier commit) with the same database: before/after figures. --reps R repeats each N and
reports min and median. --profile DIR samples the web process with py-spy (pip install py-spy;
not a dependency) over the idle window and over each change, into DIR/molt-N-idle.txt and
DIR/molt-N-change.txt (collapsed stacks). Prints one JSON object. The database is dropped at the
end; Redis database 6 (MOLT_BENCH_REDIS_DB) is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from time_to_tunnel import (  # noqa: E402
    check_bench_database,
    drop_database,
    flush_redis,
    fresh_database,
    gateway_env,
    sigterm_raises,
)

# Another Redis database with MOLT_BENCH_REDIS_DB (it is flushed): runs side by side.
REDIS_DB = int(os.environ.get("MOLT_BENCH_REDIS_DB", "6"))
HEARTBEAT, METERING, INVENTORY = 5.0, 10.0, 60.0

FLOOR_APP = r'''
"""A bare ASGI websocket app: the same handshake as the gateway, nothing else."""
import base64, json, secrets, time, os
from clawnode import wire

KEYS = {k: base64.b64decode(v) for k, v in json.load(open(os.environ["FLOOR_KEYS"])).items()}
SOCKETS = {}
ACKS = {}

async def app(scope, receive, send):
    if scope["type"] == "http":
        await receive()
        body = b"{}"
        if scope["path"] == "/change":
            rev = int(scope["query_string"].decode().split("=")[1])
            for node_id, out in list(SOCKETS.items()):
                await out({"type": "websocket.send", "text": json.dumps(
                    {"type": "desired_state", "envelope": {"body": {"revision": rev}}})})
        elif scope["path"] == "/acks":
            body = json.dumps(ACKS).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["type"] != "websocket":
        return
    await receive()  # connect
    await send({"type": "websocket.accept"})
    challenge = secrets.token_urlsafe(32)
    await send({"type": "websocket.send", "text": json.dumps(
        {"type": "challenge", "challenge": challenge, "server_time": int(time.time())})})
    node_id = None
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            SOCKETS.pop(node_id, None)
            return
        frame = json.loads(event.get("text") or "{}")
        kind = frame.get("type")
        if node_id is None and kind == "auth":
            env = frame["envelope"]
            claimed = env["body"]["node_id"]
            wire.open_envelope(env, KEYS[claimed], wire.AGENT_AUTH)
            assert env["body"]["challenge"] == challenge
            node_id = claimed
            SOCKETS[node_id] = send
            await send({"type": "websocket.send", "text": json.dumps(
                {"type": "welcome", "node_id": node_id})})
            await send({"type": "websocket.send", "text": json.dumps(
                {"type": "desired_state", "envelope": {"body": {"revision": 0}}})})
        elif kind == "ack":
            ACKS[node_id] = [frame["envelope"]["body"]["revision"], time.time()]
'''


def percentiles(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    if not ordered:
        return {"p50": None, "p95": None, "max": None}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.5), "p95": at(0.95), "max": round(ordered[-1], 1)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_http(port: int, path: str = "/healthz/", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered on {port}{path}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimAgent:
    """One simulated agent: the real frames, signed with the node's identity."""

    def __init__(self, identity: Any, url: str) -> None:
        self.identity = identity
        self.url = url
        self.ws: Any = None
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.seq = 0
        self.boot = None
        self.closed_code: int | None = None

    async def run(self) -> None:
        import websockets
        from clawnode import frames, wire

        self.boot = wire.new_nonce()
        async with websockets.connect(self.url, max_size=2**22, open_timeout=120) as ws:
            self.ws = ws
            challenge = json.loads(await ws.recv())
            await ws.send(json.dumps(frames.auth(self.identity, challenge["challenge"])))
            loops = [self._every(HEARTBEAT, self._heartbeat), self._every(METERING, self._meter),
                     self._every(INVENTORY, self._inventory)]  # fmt: skip
            try:
                async for raw in ws:
                    frame = json.loads(raw)
                    kind = frame.get("type")
                    if kind == "welcome":
                        continue
                    if kind == "desired_state":
                        if not self.ready.is_set():
                            self.ready.set()
                            self.tasks = [asyncio.ensure_future(loop) for loop in loops]
                        revision = frame["envelope"]["body"]["revision"]
                        await ws.send(json.dumps(frames.ack(self.identity, revision, {}, ())))
                    elif kind in ("error", "refused"):
                        continue
            finally:
                for task in self.tasks:
                    task.cancel()
                self.closed_code = ws.close_code

    async def _every(self, period: float, send) -> None:
        await asyncio.sleep(random.uniform(0, period))
        while True:
            await send()
            await asyncio.sleep(period)

    async def _heartbeat(self) -> None:
        await self.ws.send('{"type": "heartbeat"}')

    async def _meter(self) -> None:
        from clawnode import wire

        self.seq += 1
        body = wire.MeteringSample(
            node_id=self.identity.node_id, boot_id=self.boot, seq=self.seq,
            sampled_at=int(time.time()), peers=(),
        ).to_dict()  # fmt: skip
        envelope = wire.signed_envelope(wire.METERING, body, self.identity)
        await self.ws.send(json.dumps({"type": "metering", "envelope": envelope}))

    async def _inventory(self) -> None:
        from tests.factories import gpu

        await self.ws.send(json.dumps({
            "type": "inventory", "images": [], "gpus": [gpu(0, simulated=True).to_dict()],
            "health": [{"index": 0, "temperature_c": 40, "utilization_pct": 0}], "reason": "",
        }))  # fmt: skip


def enrol(count: int) -> list[tuple[Any, int]]:
    """`count` nodes enrolled through the real signed path: (identity, node pk)."""
    from clawnode.keys import Identity
    from django.contrib.auth import get_user_model

    from meshnet.enrolment import create_enrollment_token, enroll_node
    from tests.factories import enroll_request, gpu

    owner, _ = get_user_model().objects.get_or_create(username="bench-provider")
    out = []
    for _ in range(count):
        identity = Identity.generate()
        issued = create_enrollment_token(owner)
        node = enroll_node(
            enroll_request(identity, issued.token, gpus=[gpu(0, simulated=True)]),
            observed_ip=None,
        ).node
        out.append((identity, node.pk))
    return out


async def connect_all(agents: list[SimAgent]) -> tuple[float, list[asyncio.Task]]:
    start = time.perf_counter()
    runs = [asyncio.ensure_future(agent.run()) for agent in agents]
    waits = [asyncio.ensure_future(agent.ready.wait()) for agent in agents]
    done, _ = await asyncio.wait(waits, timeout=300)
    elapsed = time.perf_counter() - start
    if len(done) != len(agents):
        failed = [r for r in runs if r.done()]
        raise RuntimeError(
            f"{len(agents) - len(done)} of {len(agents)} agents not welcomed in 300 s; "
            f"{len(failed)} ended: {[repr(r.exception()) for r in failed[:3]]}"
        )
    return elapsed, runs


# The worker's side of a change, in a process of its own (as a Celery worker runs it): bump the
# revision of the nodes named on stdin and push them; reply with when the push returned.
WORKER = r"""
import json, sys, time
import django
django.setup()
from django.db.models import F
from meshnet.models import Node
from meshnet.tasks import push_desired_states
print("ready", flush=True)
for line in sys.stdin:
    pks = json.loads(line)
    start = time.time()
    Node.objects.filter(pk__in=pks).update(desired_revision=F("desired_revision") + 1)
    push_desired_states(pks)
    print(json.dumps({"start": start, "pushed_s": time.time() - start}), flush=True)
"""


def start_worker(env: dict, src: Path) -> subprocess.Popen:
    """The change's worker process (WORKER), started and warmed up before the change."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER], cwd=src, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
    return worker


def molt_change(
    pks: list[int], target: int, pushed: list[float], worker: subprocess.Popen | None = None
) -> dict[int, float]:
    """Bump every node's revision, push them all, and poll until each has acked `target`;
    `pushed` gets the time push_desired_states took to return (the worker's share). With
    `worker` (--worker-process), the bump and the push run there, as a Celery worker would,
    while this process polls; without it, here, before the poll, beside the simulated agents
    (whose own work then delays the push, and the push theirs)."""
    from django.db.models import F, Max

    from meshnet.models import Node
    from meshnet.tasks import push_desired_states

    # One more than the revision the nodes have now: a repetition's nodes acked the previous
    # one's change (at a fixed target, every node of a second repetition counted as acked at
    # the first poll).
    latest = Node.objects.filter(pk__in=pks).aggregate(top=Max("desired_revision"))["top"]
    target = max(target, (latest or 0) + 1)
    start = time.time()
    if worker is None:
        Node.objects.filter(pk__in=pks).update(desired_revision=F("desired_revision") + 1)
        push_desired_states(pks)
        pushed.append(time.time() - start)
    else:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(json.dumps(pks) + "\n")
        worker.stdin.flush()
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while len(seen) < len(pks) and time.monotonic() < deadline:
        now = time.time()
        # No `pk IN (...)` of every node: building that query 50 times a second took a
        # third of this process's CPU at 1,000 nodes, away from the simulated agents (the
        # nodes of other runs are back at revision 0, so they never match).
        for pk in Node.objects.filter(acked_revision__gte=target).values_list("pk", flat=True):
            seen.setdefault(pk, now - start)
        time.sleep(0.02)
    if worker is not None:
        assert worker.stdout is not None
        reply = json.loads(worker.stdout.readline())
        pushed.append(reply["start"] + reply["pushed_s"] - start)
    return seen


def floor_change(port: int, n: int, target: int) -> dict[str, float]:
    start = time.time()
    urllib.request.urlopen(f"http://127.0.0.1:{port}/change?rev={target}", timeout=60).read()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        acks = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/acks").read())
        got = {k: t - start for k, (rev, t) in acks.items() if rev >= target}
        if len(got) >= n:
            return got
        time.sleep(0.02)
    return got


async def py_spy(pid: int, output: Path) -> subprocess.Popen:
    """py-spy (not a dependency: pip install py-spy) sampling the web process into `output`
    (collapsed stacks) until stop_py_spy. Outside the process, without pausing it
    (--nonblocking): the process's own CPU time, which the idle window measures, is its own."""
    output.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(BIN / "py-spy"), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
         "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1)  # attached
    return spy


async def stop_py_spy(spy: subprocess.Popen) -> None:
    spy.send_signal(signal.SIGINT)  # writes its file and exits
    await asyncio.to_thread(spy.wait, 60)


def one_run(
    kind: str, n: int, nodes: list, env: dict, src: Path, idle: float, tmp: Path,
    profile: Path | None = None, worker_process: bool = False,
) -> dict:  # fmt: skip
    port = free_port()
    cmd = [
        str(BIN / "uvicorn"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--lifespan",
        "off",
        "--timeout-graceful-shutdown",
        "5",
        # As the gateway runs (docker/Dockerfile.gateway, Procfile.dev): no per-message deflate
        # (zlib on every frame, and its state per socket), frames up to the post-auth limit.
        "--ws-per-message-deflate",
        "false",
        "--ws-max-size",
        "1048576",
    ]
    if kind == "floor":
        cmd += ["--app-dir", str(tmp), "floor_app:app"]
    else:
        cmd += ["config.asgi:application"]
    log = open(tmp / f"{kind}-{n}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    result: dict[str, Any] = {}
    worker = None
    try:
        if kind == "molt" and worker_process:
            worker = start_worker(env, src)
        wait_http(port, "/healthz/" if kind == "molt" else "/acks")
        time.sleep(1)
        rss_before = rss_kib(proc.pid)

        async def scenario() -> dict[str, Any]:
            agents = [SimAgent(identity, f"ws://127.0.0.1:{port}/ws/agent/")
                      for identity, _ in nodes[:n]]  # fmt: skip
            burst, runs = await connect_all(agents)
            spy = None
            if profile is not None and kind == "molt":
                spy = await py_spy(proc.pid, profile / f"molt-{n}-idle.txt")
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(idle)
            idle_cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            rss_after = rss_kib(proc.pid)
            target = 1
            if spy is not None:
                await stop_py_spy(spy)
                spy = await py_spy(proc.pid, profile / f"molt-{n}-change.txt")
            pushed: list[float] = []
            if kind == "molt":
                acks = await asyncio.to_thread(
                    molt_change, [pk for _, pk in nodes[:n]], target, pushed, worker
                )
            else:
                acks = await asyncio.to_thread(floor_change, port, n, target)
            if spy is not None:
                await stop_py_spy(spy)
            lat = [v * 1000 for v in acks.values()]
            dropped = sum(1 for a in agents if a.closed_code is not None)
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            return {
                "n": n,
                "connect_burst_s": round(burst, 2),
                "idle_cpu_core_fraction": round(idle_cpu, 3),
                "rss_kib_per_agent": round((rss_after - rss_before) / n, 1),
                "change_to_all_acked_ms": percentiles(lat),
                **({"pushed_ms": round(pushed[0] * 1000, 1)} if pushed else {}),
                "acked": len(acks),
                "closed_during_run": dropped,
            }

        result = asyncio.run(scenario())
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    return result


def summarise(runs: list[dict]) -> dict:
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {"n": runs[0]["n"], "reps": len(runs)}
    for key in ("connect_burst_s", "idle_cpu_core_fraction", "rss_kib_per_agent"):
        values = [r[key] for r in runs]
        out[key] = {"min": min(values), "median": statistics.median(values)}
    out["change_to_all_acked_ms"] = {
        q: {"min": min(r["change_to_all_acked_ms"][q] for r in runs),
            "median": statistics.median(r["change_to_all_acked_ms"][q] for r in runs)}
        for q in ("p50", "p95", "max")
    }  # fmt: skip
    out["acked"] = [r["acked"] for r in runs]
    out["closed_during_run"] = [r["closed_during_run"] for r in runs]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--gateway-src", type=Path, default=REPO)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--profile", type=Path, help="py-spy the web process into this folder")
    parser.add_argument(
        "--worker-process", action="store_true",
        help="run the change's bump and push in a process of its own, as a Celery worker would",
    )  # fmt: skip
    args = parser.parse_args()
    database_url = os.environ.get(
        "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/molt_bench_plane"
    )
    check_bench_database(database_url)
    sigterm_raises()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server
    tmp = Path(tempfile.mkdtemp(prefix="molt-agent-plane-"))
    env = {
        **os.environ,
        **gateway_env(
            database_url=database_url,
            state_dir=tmp / "state",
            redis_db=REDIS_DB,
            host="127.0.0.1",
            tag="plane-bench",
        ),
    }
    env["PYTHONPATH"] = f"{args.gateway_src}:{args.gateway_src / 'provider_agent'}"
    # Every simulated agent connects from 127.0.0.1, where real ones each have an address of
    # their own: the per-address caps (meshnet.agent_guard) would refuse all but the first 64
    # of a burst. 0 turns a cap off.
    env["MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS"] = "0"
    env["MOLT_AGENT_CONNECTIONS_PER_ADDRESS"] = "0"
    os.environ.update(env)
    fresh_database(database_url)
    flush_redis(REDIS_DB)
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        started = time.monotonic()
        nodes = enrol(max(args.n))
        enrol_s = time.monotonic() - started
        keys = {i.node_id: base64.b64encode(i.public_key).decode() for i, _ in nodes}
        (tmp / "keys.json").write_text(json.dumps(keys))
        (tmp / "floor_app.py").write_text(FLOOR_APP)
        floor_env = {**env, "FLOOR_KEYS": str(tmp / "keys.json")}
        from django.db import connection

        connection.close()
        results: dict[str, Any] = {
            "what": "N simulated agents (real signed frames, default periods) on one uvicorn "
            "web process (DEBUG off, PostgreSQL, Redis), and a bare ASGI websocket floor",
            "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
            "gateway_src": str(args.gateway_src),
            "push_in": "a worker process" if args.worker_process else "this process",
            "idle_window_s": args.idle,
            "enrol_s": round(enrol_s, 1),
            "runs": [],
        }
        for n in args.n:
            molt = [one_run("molt", n, nodes, env, args.gateway_src, args.idle, tmp, args.profile,
                            args.worker_process) for _ in range(args.reps)]  # fmt: skip
            entry = summarise(molt)
            if not args.no_floor:
                floor = [one_run("floor", n, nodes, floor_env, REPO, args.idle, tmp)
                         for _ in range(args.reps)]  # fmt: skip
                entry["floor"] = summarise(floor)
            results["runs"].append(entry)
            # Reset revisions so the next N starts from the same state.
            from meshnet.models import Node

            Node.objects.update(desired_revision=0, acked_revision=0)
            connection.close()
            print(json.dumps(entry), file=sys.stderr, flush=True)
        print(json.dumps(results, indent=2))
    finally:
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        drop_database(database_url)
        flush_redis(REDIS_DB)
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda args: None
    sys.exit(main())
