"""The read path at market scale: GET /api/v1/listings/ at 10k listings and enrolment at 5,000
nodes, against one real uvicorn process (DEBUG off, PostgreSQL, Redis); prints JSON.

    .venv/bin/python benchmarks/read_path.py [--clients 8] [--requests 1600] [--enrolments 200]

DATABASE_URL (default postgres://postgres@127.0.0.1:5432/molt_bench_read_path) is dropped and
created afresh: give it a database of its own. REDIS_URL defaults to redis://127.0.0.1:6379/7.

Seeded in bulk (not through the services, which would take an hour): 50 providers, 5,000
nodes (90 % online, the rest last seen two days ago), two GPUs each with
driver and CUDA versions, a reliability score on two thirds of them, and 10,000 listings (two
per node) at spread prices.

Measured, each with `--clients` keep-alive HTTP connections in threads:
- `listings_first_page`: GET /api/v1/listings/ (default order, 50 rows);
- `listings_deep_page`: the page about 9,000 rows in (the cursor reached by following `next`);
- `listings_filtered`: min_driver_version + min_cuda_version + ordering=-reliability;
- `bare_drf_floor`: in the same process, a DRF view with the same authentication and
  permissions returning 50 constant rows of the listing's shape (what Django + DRF + token
  auth + JSON cost without any query of the market): the floor a listings page can approach;
- `enrolment`: POST /api/v1/nodes/enroll/ (signed envelopes made beforehand), one client and
  then `--clients`, at 5,000 nodes: latency p50/p95 and the queries one enrolment makes.
Each reports requests/s, p50/p95/p99 and the server's CPU milliseconds per request (from
/proc of the uvicorn process). Nothing is asserted: the figures go into docs/operations.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from asgi_servers import free_port, percentiles, wait_up  # noqa: E402
from pages import fresh_database  # noqa: E402

NODES = 5000
LISTINGS_PER_NODE = 2


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, pid: int, paths: list[str], token: str, requests: int, clients: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(requests // clients, 1)

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for i in range(per_client):
            start = time.perf_counter()
            path = paths[(offset + i) % len(paths)]
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, (response.status, path)
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    cpu0 = cpu_seconds(pid)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu0
    return {
        **percentiles(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "server_cpu_ms_per_request": round(cpu * 1000 / len(latencies), 2),
    }


def get_json(port: int, path: str, token: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body[:300])
    return json.loads(body)


def seed() -> dict:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from marketplace.models import Listing, NodeReliability
    from marketplace.tokens import issue_api_token
    from meshnet import ipplan
    from meshnet.allocation import allocate_address
    from meshnet.models import Gpu, IpAllocation, IpPool, Node

    # A gateway from before the version keys (a baseline run) has no such columns.
    keyed = any(field.name == "driver_version_key" for field in Gpu._meta.get_fields())
    if keyed:
        from meshnet.versions import version_key

    rng = random.Random(14)
    User = get_user_model()
    providers = User.objects.bulk_create(User(username=f"provider-{i}") for i in range(50))
    buyer = User.objects.create_user("bench-buyer", password=secrets.token_urlsafe(12))
    # The pool as enrolment leaves it after 5,000 nodes: its next fresh offset past them.
    allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.NODE)
    pool = IpPool.objects.get(name=ipplan.MOLT_POOL)
    first = pool.next_offset
    now = timezone.now()
    nodes = []
    for i in range(NODES):
        identity = secrets.token_bytes(32)
        nodes.append(
            Node(
                owner=providers[i % 50],
                node_id=f"nd_bench{i:06d}",
                name=f"bench-{i}",
                identity_public_key=f"id{i:010d}{identity.hex()[:30]}",
                wireguard_public_key=f"wg{i:010d}{identity.hex()[30:60]}",
                mesh_address=str(ipplan.address_at(pool.network, first + i)),
                region=rng.choice(list(ipplan.REGIONS)),
                last_seen_at=now if i % 10 else now - timezone.timedelta(days=2),
                images=["pytorch"],
            )
        )
    nodes = Node.objects.bulk_create(nodes, batch_size=1000)
    IpPool.objects.filter(pk=pool.pk).update(next_offset=first + NODES)
    drivers = ["535.104.05", "550.54.14", "560.35.03"]
    cudas = ["12.2", "12.4", "12.6"]
    gpus, listings, scores = [], [], []
    for n, node in enumerate(nodes):
        model = rng.choice(["RTX 4090", "A100 80GB", "H100", "L4"])
        v = rng.randrange(3)
        for index in range(2):
            gpus.append(
                Gpu(
                    node=node,
                    index=index,
                    name=model,
                    memory_mb=24564,
                    uuid=f"GPU-{n}-{index}",
                    driver_version=drivers[v],
                    cuda_version=cudas[v],
                    **(
                        {
                            "driver_version_key": version_key(drivers[v]),
                            "cuda_version_key": version_key(cudas[v]),
                        }
                        if keyed
                        else {}
                    ),
                )
            )
            listings.append(
                Listing(
                    owner_id=node.owner_id,
                    node=node,
                    gpu_model=model,
                    vram_gb=24,
                    gpu_count=1,
                    price_per_gpu_hour=rng.randrange(100_000, 5_000_000, 1000),
                    price_per_gib=rng.randrange(1000, 50_000, 1000),
                    region=node.region,
                    images=["pytorch"],
                )
            )
        if n % 3:
            scores.append(
                NodeReliability(
                    node=node,
                    score=rng.randrange(50, 101),
                    jobs_completed=10,
                    jobs_failed=0,
                    uptime_bp=9900,
                )
            )
    Gpu.objects.bulk_create(gpus, batch_size=2000)
    Listing.objects.bulk_create(listings, batch_size=2000)
    NodeReliability.objects.bulk_create(scores, batch_size=2000)
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    return {"buyer": buyer, "token": issue_api_token(buyer), "provider": providers[0]}


def enrolment_envelopes(provider, count: int) -> list[bytes]:
    from clawnode.keys import Identity

    from meshnet.enrolment import create_enrollment_token
    from tests.factories import enroll_request, gpu

    return [
        json.dumps(
            enroll_request(
                Identity.generate(), create_enrollment_token(provider).token, gpus=[gpu(0), gpu(1)]
            )
        ).encode()
        for _ in range(count)
    ]


def enrol(port: int, pid: int, bodies: list[bytes], clients: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [bodies[i::clients] for i in range(clients)]

    def client(mine_bodies: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for body in mine_bodies:
            start = time.perf_counter()
            conn.request("POST", "/api/v1/nodes/enroll/", body=body,
                         headers={"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            text = response.read()
            assert response.status == 201, (response.status, text[:300])
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in chunks]
    cpu0 = cpu_seconds(pid)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {
        **percentiles(latencies),
        "enrolments_per_s": round(len(latencies) / elapsed, 1),
        "server_cpu_ms_per_request": round((cpu_seconds(pid) - cpu0) * 1000 / len(latencies), 2),
    }


def enrolment_queries(provider) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from meshnet.enrolment import enroll_node

    body = json.loads(enrolment_envelopes(provider, 1)[0])
    with CaptureQueriesContext(connection) as captured:
        enroll_node(body, observed_ip="203.0.113.9")
    return len(captured.captured_queries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--enrolments", type=int, default=200)
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/molt_bench_read_path")
    engine = fresh_database(url)
    env = {
        **os.environ,
        "DJANGO_DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "SECURE_SSL_REDIRECT": "false",
        "DJANGO_SETTINGS_MODULE": "benchmarks.read_path_settings",
        "DATABASE_URL": url,
        "MOLT_ALLOW_SIMULATED_GPUS": "true",
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/7"),
        "MOLT_CHANNEL_PREFIX": os.environ.get("MOLT_CHANNEL_PREFIX", "molt-bench-read-path"),
        "MOLT_THROTTLE_ENROLL": "1000000/min",
        # No agents heartbeat here: "online" is "seen within the hour" for the run's length
        # (the seed's online nodes were seen at its start, the offline ones two days ago).
        "MOLT_NODE_OFFLINE_AFTER_SECONDS": "3600",
        "LOG_LEVEL": "WARNING",
        "ALLOWED_HOSTS": "127.0.0.1,testserver",
        "CELERY_BROKER_URL": "memory://",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    t0 = time.perf_counter()
    seeded = seed()
    bodies = enrolment_envelopes(seeded["provider"], args.enrolments * 2)
    seed_s = round(time.perf_counter() - t0, 1)
    queries = enrolment_queries(seeded["provider"])
    token = seeded["token"]

    port = free_port()
    command = [str(BIN / "uvicorn"), "config.asgi:application", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--lifespan", "off"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    results: dict[str, object] = {
        "what": "listings and enrolment through one uvicorn process (DEBUG off)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "database": engine,
        "listings": NODES * LISTINGS_PER_NODE,
        "nodes": NODES,
        "clients": args.clients,
        "requests_per_case": args.requests,
        "seed_s": seed_s,
    }
    try:
        wait_up(port)
        first = "/api/v1/listings/"
        # Follow next about 9,000 rows in (the market shows ~9,000 online listings).
        path, depth = first, 0
        while depth < 8950:
            page = get_json(port, path, token)
            if page["next"] is None:
                break
            path = urlsplit(page["next"])
            path = f"{path.path}?{path.query}"
            depth += len(page["results"])
        deep = path
        filtered = (
            "/api/v1/listings/?min_driver_version=550&min_cuda_version=12.4&ordering=-reliability"
        )
        cases = {
            "bare_drf_floor": ["/bench/floor/"],
            "listings_first_page": [first],
            "listings_deep_page": [deep],
            "listings_filtered": [filtered],
        }
        results["deep_page_rows_in"] = depth
        results["page_keys"] = sorted(get_json(port, first, token))
        for name, paths in cases.items():
            if name != "bare_drf_floor":  # a page of rows, not an empty one
                assert len(get_json(port, paths[0], token)["results"]) == 50, name
            load(port, proc.pid, paths, token, 200, args.clients)  # warm-up
            results[name] = load(port, proc.pid, paths, token, args.requests, args.clients)
        results["enrolment_queries"] = queries
        results["enrolment_1_client"] = enrol(port, proc.pid, bodies[: args.enrolments], 1)
        results[f"enrolment_{args.clients}_clients"] = enrol(
            port, proc.pid, bodies[args.enrolments :], args.clients
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
