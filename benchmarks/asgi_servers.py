"""Which ASGI server runs the gateway: uvicorn or daphne, measured on our own app.

    .venv/bin/python benchmarks/asgi_servers.py [--requests 2000] [--clients 8]

For each server, started as its own process on the same database (SQLite with the demo data
of `seed_demo`, in a temporary directory), this measures:
- an authenticated `GET /api/v1/listings/` (DRF, token auth, filters, pagination) from
  `--clients` keep-alive HTTP connections in threads: latency percentiles and requests/s;
- the agent channel: websocket connect, challenge, signed auth and welcome, 50 times in a row
  (what every agent reconnect costs);
- the server's resident memory after the run.
Baseline in the same run: the same GET through Django's in-process test client (no server,
no socket), so the figures read as "server overhead on top of the view itself".
Prints one JSON object. Nothing is asserted: the numbers back the choice in docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": at(1.0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    total = 0
    for child in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return round(total / 1024, 1)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def load(port: int, token: str, requests: int, clients: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = requests // clients

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(per_client):
            start = time.perf_counter()
            conn.request("GET", "/api/v1/listings/?ordering=price_per_gpu_hour",
                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def agent_connects(port: int, identity, rounds: int = 50) -> list[float]:
    import websockets
    from clawnode import wire

    async def main() -> list[float]:
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/agent/") as ws:
                challenge = json.loads(await ws.recv())
                body = wire.AgentAuth(
                    node_id=identity.node_id,
                    challenge=challenge["challenge"],
                    timestamp=int(time.time()),
                ).to_dict()
                envelope = wire.signed_envelope(wire.AGENT_AUTH, body, identity)
                await ws.send(json.dumps({"type": "auth", "envelope": envelope}))
                while json.loads(await ws.recv())["type"] != "welcome":
                    pass
                out.append(time.perf_counter() - start)
        return out

    return asyncio.run(main())


def wait_up(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz/")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on {port} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="molt-asgi-bench-")
    env = {
        **os.environ,
        "DJANGO_DEBUG": "true",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3",
        "MOLT_STATE_DIR": f"{tmp}/state",
        "MOLT_ALLOW_SIMULATED_GPUS": "true",
        "REDIS_URL": "redis://127.0.0.1:6379/15",
        "MOLT_CHANNEL_PREFIX": "molt-asgi-bench",
        "LOG_LEVEL": "WARNING",
        "ALLOWED_HOSTS": "127.0.0.1,testserver",
    }
    os.environ.update(env)
    import django

    django.setup()
    from clawnode.keys import Identity
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from marketplace.tokens import issue_api_token
    from meshnet.enrolment import create_enrollment_token, enroll_node
    from tests.factories import enroll_request, gpu

    call_command("migrate", verbosity=0)
    call_command("seed_demo", stdout=open(os.devnull, "w"))  # noqa: SIM115
    buyer = get_user_model().objects.get(username="demo-buyer")
    token = issue_api_token(buyer)
    identity = Identity.generate()
    provider = get_user_model().objects.get(username="home-provider")
    issued = create_enrollment_token(provider)
    enroll_node(enroll_request(identity, issued.token, gpus=[gpu(0, simulated=True)]),
                     observed_ip=None)  # fmt: skip

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    baseline = []
    for _ in range(500):
        start = time.perf_counter()
        assert client.get("/api/v1/listings/?ordering=price_per_gpu_hour").status_code == 200
        baseline.append(time.perf_counter() - start)

    servers = {
        "uvicorn": lambda port: [str(BIN / "uvicorn"), "config.asgi:application", "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                 "--lifespan", "off"],
        "daphne": lambda port: [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                                "-v", "0", "config.asgi:application"],
    }  # fmt: skip
    results: dict[str, object] = {
        "what": "authenticated GET /api/v1/listings/ and agent websocket auth, per ASGI server",
        "requests": args.requests,
        "clients": args.clients,
        "baseline_in_process": {"get_listings": percentiles(baseline)},
    }
    for name, command in servers.items():
        port = free_port()
        proc = subprocess.Popen(command(port), cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_up(port)
            load(port, token, 200, args.clients)  # warm-up
            latencies, elapsed = load(port, token, args.requests, args.clients)
            connects = agent_connects(port, identity)
            results[name] = {
                "get_listings": {
                    **percentiles(latencies),
                    "requests_per_s": round(len(latencies) / elapsed, 1),
                },
                "agent_connect_auth": percentiles(connects),
                "rss_mb": rss_mb(proc.pid),
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
    u, d = results["uvicorn"], results["daphne"]
    results["daphne_over_uvicorn_p95"] = round(
        d["get_listings"]["p95_ms"] / u["get_listings"]["p95_ms"], 2
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
