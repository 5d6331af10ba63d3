"""The cluster mesh's data path between two sandboxes against a bare veth between the same two
namespaces, in the same run; and the time from a cluster order to every part ready.

    sudo .venv/bin/python benchmarks/mesh_path.py [--repeat 3] [--mib 64] [--pings 100]
        [--sizes 4,64] [--reps 5]

(root, rootful podman, wireguard-go, wg, nft, ip, ping; the mesh tier's image (the sandbox tier's
plus Debian's python3-torch, tests/sandbox/image.py: built once and cached); DATABASE_URL default
postgres://postgres@127.0.0.1:5432/molt_bench_mesh_path, created and dropped; Redis database
MOLT_BENCH_REDIS_DB, default 2, flushed before and after.)

Real parts only, the mesh tier's harness (tests/mesh/test_cluster_collective.py) with two public
nodes: PostgreSQL, Redis, uvicorn and a Celery worker in the root namespace on a testbed bridge
(198.18.10.0/24); two providers' nodes, each `clawnode join` and `clawnode run --sandbox-engine
podman` (userspace backend: wireguard-go) in a namespace of its own, each agent in a mount
namespace and podman store of its own (the test's `Host`).

Per repeat (the first one a warm-up, reported apart):

1. order floor: t0, `POST /api/v1/orders/` of one GPU on the first node, until the order is
   `running` (Order.running_since: peer acknowledged, sandbox's sshd answered the agent); stop.
2. cluster order: t0, `POST /api/v1/clusters/` of one GPU on each node, until every part is
   `running`; the figure is the last part's running_since - t0 (a part is running only once its
   sandbox is ready and its node acknowledged the node-to-node peer).
3. the path, between the cluster's two sandboxes, each way measured as the same thing:
   - mesh: to the other sandbox's address over its eth0: sandbox veth, the node's nftables
     forward chain (the order's member pairs), the node's wireguard-go (the job-scoped
     node-to-node peer), the bridge, the other node's wireguard-go, nftables and veth;
   - bare veth (the baseline): a veth made by this script straight between the same two sandbox
     network namespaces (10.254.44.1/30 and .2/30), nothing else on the way.
   On each path, interleaved: `ping -i 0.01` RTTs (`--pings`, ping run in the sandbox's network
   namespace); TCP throughput: `--mib` MiB over one connection, a Python sender and sink in the
   two sandbox namespaces (the sender's wall time from connect to the sink's close); and a
   torch.distributed all-reduce with the gloo backend, world size 2, one rank in each sandbox
   (`podman exec` in the containers, their CPU limits: 1 CPU per GPU; OMP_NUM_THREADS=1,
   GLOO_SOCKET_IFNAME eth0 or the veth), per `--sizes` MiB tensor one untimed all-reduce then
   `--reps` timed ones, each after a barrier; the figure per rep is the slower rank's, and each
   rank checks the sum. The mesh's TCP transfer is checked to have gone through the
   node-to-node peer (its wireguard-go transfer counter grew by at least the bytes moved), and
   the two nodes' wireguard-go processes' CPU time during each transfer is read from /proc:
   CPU seconds per second of transfer, how many cores the userspace WireGuard kept busy.
4. stop the cluster order, until every part is `completed`.

Prints one JSON object: per path the samples' p50/p95/min/max (ping in ms, TCP in MB/s,
all-reduce in ms per size, with its algorithm bandwidth in MB/s at p50), the mesh's p50 as a
share of the veth's, and the order figures' p50/p95 (ms) with the cluster's over the floor's.
Everything made (namespaces, links, processes, containers, database, temporary files) is
removed at the end, also on failure or SIGTERM. Exit 0 when every repeat ran and every check
held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "provider_agent"))

import time_to_tunnel as tt  # noqa: E402  (benchmarks/time_to_tunnel.py: the shared harness)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/molt_bench_mesh_path"
REDIS_DB = int(os.environ.get("MOLT_BENCH_REDIS_DB", "2"))
BRIDGE_NET = "198.18.10"  # RFC 2544's range, none of the other benchmarks' nor the tests'
VETH_NET = "10.254.44"  # the bare veth's /30, a range no test or plan uses
VETH_NAME = "bare0"
TCP_PORT = 5301
GLOO_PORT = 29511

# Both ends of the TCP measurement, run with the host's Python in a sandbox's namespace.
# `sink ADDRESS PORT`: prints "ready", accepts one connection, counts until EOF, closes, prints
# {"received": n}. `source ADDRESS PORT BYTES`: connects, sends, shuts its side, waits for the
# sink's close; prints {"sent": n, "seconds": s} (connect to close).
TCP_HELPER = r"""
import json, socket, sys, time
mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "sink":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(1)
    print("ready", flush=True)
    server.settimeout(60)
    conn, _ = server.accept()
    received = 0
    buffer = bytearray(1 << 18)
    while True:
        got = conn.recv_into(buffer)
        if not got:
            break
        received += got
    conn.close()
    print(json.dumps({"received": received}), flush=True)
else:
    size = int(sys.argv[4])
    chunk = b"\xa5" * (1 << 18)
    began = time.perf_counter()
    conn = socket.create_connection((address, port), timeout=60)
    left = size
    while left:
        left -= conn.send(chunk[: min(left, len(chunk))])
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(1 << 16):
        pass
    seconds = time.perf_counter() - began
    conn.close()
    print(json.dumps({"sent": size, "seconds": seconds}), flush=True)
"""

# One rank of the all-reduce, run in a sandbox with its python3-torch: argv rank, world,
# rendezvous address, port, sizes (MiB, comma-separated), reps. Rank r contributes r + 1 in
# every element, so every element of the sum is world * (world + 1) / 2, exactly.
ALL_REDUCE = r"""
import datetime, json, sys, time, torch, torch.distributed as dist
rank, world, master, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sizes, reps = [int(x) for x in sys.argv[5].split(",")], int(sys.argv[6])
assert dist.is_gloo_available()
dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank,
                        world_size=world, timeout=datetime.timedelta(seconds=120))
want = float(world * (world + 1) // 2)
out = {}
for mib in sizes:
    t = torch.empty(mib * (1 << 20) // 4, dtype=torch.float32)
    t.fill_(rank + 1.0)
    dist.all_reduce(t)  # untimed: the pairs' buffers for this size
    seconds, ok = [], bool(torch.all(t == want))
    for _ in range(reps):
        t.fill_(rank + 1.0)
        dist.barrier()
        began = time.perf_counter()
        dist.all_reduce(t)
        seconds.append(time.perf_counter() - began)
        ok = ok and bool(torch.all(t == want))
    out[str(mib)] = {"seconds": seconds, "sum_ok": ok}
dist.destroy_process_group()
print("RESULT " + json.dumps(out), flush=True)
"""

PING_TIME = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


# -- measuring helpers (pure or local: tests/unit/test_mesh_path_helpers.py runs them) ----------


def summary(values: list[float], digits: int = 3) -> dict[str, float]:
    """n, p50, p95, min, max, mean of `values` (nearest rank on the sorted samples)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]

    return {
        "n": len(ordered),
        "p50": round(rank(0.5), digits),
        "p95": round(rank(0.95), digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
        "mean": round(sum(ordered) / len(ordered), digits),
    }


def parse_ping(output: str) -> tuple[list[float], int]:
    """RTTs in ms of every reply in `ping`'s output, and how many replies were duplicates."""
    seen: dict[int, float] = {}
    duplicates = 0
    for match in PING_TIME.finditer(output):
        seq, rtt = int(match.group(1)), float(match.group(2))
        if seq in seen:
            duplicates += 1
            continue
        seen[seq] = rtt
    return [seen[seq] for seq in sorted(seen)], duplicates


def tcp_transfer(
    sender: list[str], receiver: list[str], address: str, size: int, port: int = TCP_PORT
) -> dict[str, Any]:
    """`size` bytes over one TCP connection to `address`: the sink started with the `receiver`
    prefix (e.g. nsenter into a namespace), the source with `sender`'s. Returns the sink's count,
    the source's seconds and MB/s."""
    sink = subprocess.Popen(
        [*receiver, sys.executable, "-c", TCP_HELPER, "sink", address, str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the sink did not start: {sink.communicate(timeout=10)}")
        sent = subprocess.run(
            [*sender, sys.executable, "-c", TCP_HELPER, "source", address, str(port), str(size)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if sent.returncode != 0:
            raise RuntimeError(f"the source failed: {sent.stderr[-500:]}")
        out, _ = sink.communicate(timeout=60)
        result = {**json.loads(out), **json.loads(sent.stdout)}
        result["MBps"] = result["received"] / result["seconds"] / 1e6
        return result
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(timeout=10)


def all_reduce_samples(rank_outputs: list[str], sizes: list[int]) -> dict[int, list[float]]:
    """Per size, the seconds of each timed all-reduce, the slower rank's; raises if a rank
    printed no result or saw a wrong sum."""
    per_rank = []
    for rank, output in enumerate(rank_outputs):
        line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"rank {rank} printed no result: {output[-1500:]}")
        per_rank.append(json.loads(line[len("RESULT ") :]))
    samples: dict[int, list[float]] = {}
    for mib in sizes:
        rows = [result[str(mib)] for result in per_rank]
        if not all(row["sum_ok"] for row in rows):
            raise RuntimeError(f"a rank saw a wrong sum at {mib} MiB: {rows}")
        samples[mib] = [max(times) for times in zip(*(row["seconds"] for row in rows), strict=True)]
    return samples


def cpu_seconds(argv_words: set[str], proc: Path = Path("/proc")) -> tuple[int, float]:
    """How many processes have all of `argv_words` in their argv (a word may be a program's
    path: its base name counts), and their user + system CPU seconds together."""
    count, total = 0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in proc.glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not argv_words <= {*argv, *(Path(word).name for word in argv)}:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            count += 1
    return count, total


# -- the benchmark ---------------------------------------------------------------------------


def nsenter_net(pid: int) -> list[str]:
    return ["nsenter", "-t", str(pid), "--net"]


def run(args: argparse.Namespace, database_url: str, tmp: Path) -> tuple[dict[str, Any], bool]:
    from tests.sandbox import image as sandbox_image
    from tests.sandbox.conftest import agent_engine_args, podman_global_args

    tag = sandbox_image.ensure_image(podman_global_args(), sandbox_image.TORCH)
    args.host = tt.host_info()  # the load before the run
    sizes = [int(x) for x in args.sizes.split(",")]
    with tt.bench_testbed(BRIDGE_NET, "m") as bed:
        provs = [bed.namespace("ma"), bed.namespace("mb")]
        endpoints = [f"{bed.attach(ns)}:{tt.PROVIDER_PORT}" for ns in provs]
        ifaces = [bed.wireguard_name(f"m{i}") for i in range(2)]
        env = tt.gateway_env(
            database_url=database_url, state_dir=tmp / "gateway-state", redis_db=REDIS_DB,
            host=bed.gateway_ip, tag="meshpath",
        )  # fmt: skip
        env["MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS"] = "0"
        os.environ.update(env)
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from tests.mesh.test_cluster_collective import Host

        call_command("migrate", verbosity=0)
        hosts = [Host(ns, tmp) for ns in provs]
        try:
            return _run(args, bed, tmp, tag, sizes, provs, endpoints, ifaces, env, hosts,
                        get_user_model(), agent_engine_args())  # fmt: skip
        finally:
            # Containers are not the agents' children; their namespaces go with the agents'
            # mount namespaces when the testbed ends the agents.
            for host in hosts:
                with contextlib.suppress(Exception):
                    host.remove_sandboxes()


def _run(args, bed, tmp, tag, sizes, provs, endpoints, ifaces, env, hosts, users, engine_args):
    from clawnode.sandbox.manager import container_name

    from marketplace import ledger
    from marketplace.listings import create_listing
    from marketplace.models import Order
    from marketplace.tokens import issue_api_token
    from meshnet.enrolment import create_enrollment_token
    from meshnet.models import Node, Sandbox
    from tests.sandbox.conftest import podman_global_args

    with tt.running_gateway(env, bed.gateway_ip, tmp) as gateway:
        owners = [users.objects.create_user(f"bench-prov{i}", password=os.urandom(8).hex())
                  for i in range(2)]  # fmt: skip
        buyer = users.objects.create_user("bench-buyer", password=os.urandom(8).hex())
        nodes = []
        for i, (ns, iface, owner) in enumerate(zip(provs, ifaces, owners, strict=True)):
            state_dir = tmp / f"clawnode-{i}"
            name, _ = tt.join_node(
                bed, ns, gateway_url=gateway.base_url,
                token=create_enrollment_token(owner).token, state_dir=state_dir,
                iface=iface, endpoint=endpoints[i], gpus="RTX 4090:2",
            )  # fmt: skip
            nodes.append(Node.objects.get(name=name))
            hosts[i].start_agent(
                bed,
                [str(BIN / "clawnode"), "run", "--state-dir", str(state_dir),
                 "--simulated-gpus", "RTX 4090:2", "--sandbox-engine", "podman",
                 "--image", tag, *engine_args],
                open(tmp / f"agent-{i}.log", "ab"),  # noqa: SIM115  (lives with the agent)
            )  # fmt: skip

        def agent_logs() -> str:
            return "".join(
                f"--- agent {i} ---\n{(tmp / f'agent-{i}.log').read_text()[-3000:]}\n"
                for i in range(2)
            )

        for node in nodes:
            tt.wait_until(
                lambda pk=node.pk: tag in (Node.objects.get(pk=pk).images or []),
                timeout=90, interval=0.2, message=f"the agents to report the image\n{agent_logs()}",
            )  # fmt: skip
        listings = [
            create_listing(owner, node=node, gpu_count=2, price_per_gpu_hour=1_000_000,
                           price_per_gib=100_000, cpus_per_gpu=1, memory_gb_per_gpu=2, disk_gb=5)
            for owner, node in zip(owners, nodes, strict=True)
        ]  # fmt: skip
        ledger.grant_credits(buyer, 10**13)
        token = issue_api_token(buyer)
        node_keys = {node.wireguard_public_key: i for i, node in enumerate(nodes)}
        # Sandbox orders take the buyer's SSH keys (none is used here: nothing logs in).
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id")],
                       check=True, timeout=30)  # fmt: skip

        def api(method: str, path: str, body: dict | None = None) -> dict:
            status, text = tt.call(gateway.base_url, method, path, token, body)
            if status not in (200, 201):
                raise RuntimeError(f"{method} {path} answered {status}: {text[:500]}")
            return json.loads(text)

        def wait_orders(ids: list[int], states: tuple[str, ...], timeout: float) -> None:
            rows = Order.objects.filter(pk__in=ids)
            tt.wait_until(
                lambda: all(s in states for s in rows.values_list("state", flat=True)),
                timeout=timeout, interval=0.005,
                message=f"orders {ids} to be {'/'.join(states)}: "
                f"{list(rows.values_list('state', 'reason'))}\n{agent_logs()}",
            )  # fmt: skip

        api("POST", "/api/v1/ssh-keys/",
            {"name": "bench", "public_key": (tmp / "id.pub").read_text().strip()})  # fmt: skip

        def single_order() -> float:
            t0 = time.time()
            order_id = api("POST", "/api/v1/orders/", {
                "listing": listings[0].pk, "gpu_count": 1, "hours": 1,
                "wireguard_public_key": tt.wg_keypair()[1]})["id"]  # fmt: skip
            wait_orders([order_id], ("running", "failed", "cancelled", "completed"), 120)
            order = Order.objects.get(pk=order_id)
            if order.state != "running":
                raise RuntimeError(f"order {order_id} is {order.state}: {order.reason}")
            api("POST", f"/api/v1/orders/{order_id}/stop/", {})
            wait_orders([order_id], ("completed",), 120)
            return order.running_since.timestamp() - t0

        def cluster_order() -> tuple[int, list[int], float]:
            t0 = time.time()
            cluster_id = api("POST", "/api/v1/clusters/", {
                "parts": [{"listing": lst.pk, "gpu_count": 1} for lst in listings],
                "hours": 1, "on_part_loss": "end",
                "wireguard_public_key": tt.wg_keypair()[1]})["id"]  # fmt: skip
            tt.wait_until(
                lambda: Order.objects.filter(cluster_id=cluster_id).count() == len(listings),
                timeout=30, interval=0.005, message=f"cluster {cluster_id}'s parts",
            )  # fmt: skip
            ids = list(
                Order.objects.filter(cluster_id=cluster_id)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            wait_orders(ids, ("running", "failed", "cancelled", "completed"), 240)
            orders = list(Order.objects.filter(pk__in=ids).order_by("pk"))
            if {o.state for o in orders} != {"running"}:
                raise RuntimeError(f"cluster {cluster_id}: {[(o.state, o.reason) for o in orders]}")
            return cluster_id, ids, max(o.running_since.timestamp() for o in orders) - t0

        def node_peer_bytes(i: int) -> int:
            """rx + tx of node i's node-to-node peers, from its wireguard-go."""
            out = bed.exec(provs[i], "wg", "show", ifaces[i], "transfer").stdout
            total = 0
            for line in out.splitlines():
                key, rx, tx = line.split("\t")
                if key in node_keys:
                    total += int(rx) + int(tx)
            return total

        def measure(ids: list[int], samples: dict[str, dict[str, Any]]) -> dict[str, Any]:
            boxes = [Sandbox.objects.get(ref=f"order:{order_id}") for order_id in ids]
            at = [next(i for i, n in enumerate(nodes) if n.pk == box.node_id) for box in boxes]
            if sorted(at) != [0, 1]:
                raise RuntimeError(f"the parts are not on both nodes: {at}")
            names = [container_name(box.ref) for box in boxes]
            pids = [
                int(hosts[n].podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
                for n, name in zip(at, names, strict=True)
            ]
            # The baseline: a bare veth straight between the two sandbox namespaces.
            a, b = f"mpa{os.getpid() % 100000}", f"mpb{os.getpid() % 100000}"
            for argv in (
                ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
                ["ip", "link", "set", a, "netns", str(pids[0])],
                ["ip", "link", "set", b, "netns", str(pids[1])],
            ):
                subprocess.run(argv, check=True, capture_output=True, timeout=30)
            for pid, link, host in ((pids[0], a, 1), (pids[1], b, 2)):
                for argv in (
                    ["ip", "link", "set", link, "name", VETH_NAME],
                    ["ip", "addr", "add", f"{VETH_NET}.{host}/30", "dev", VETH_NAME],
                    ["ip", "link", "set", VETH_NAME, "up"],
                ):
                    subprocess.run([*nsenter_net(pid), *argv], check=True, capture_output=True,
                                   timeout=30)  # fmt: skip
            paths = {
                "mesh": {"to": [boxes[1].address, boxes[0].address], "ifname": "eth0"},
                "veth": {"to": [f"{VETH_NET}.2", f"{VETH_NET}.1"], "ifname": VETH_NAME},
            }
            # Until each path answers both ways (the mesh's first packet waits for the
            # node-to-node handshake).
            for path in paths.values():
                for side in (0, 1):
                    tt.wait_until(
                        lambda side=side, path=path: subprocess.run(
                            [*nsenter_net(pids[side]), "ping", "-c", "1", "-W", "1",
                             path["to"][side]], capture_output=True, timeout=10,
                        ).returncode == 0,
                        timeout=30, interval=0.1, message=f"ping {path['to'][side]}",
                    )  # fmt: skip
            mtus = {}
            for name, path in paths.items():
                shown = subprocess.run(
                    [*nsenter_net(pids[0]), "ip", "-o", "link", "show", "dev", path["ifname"]],
                    capture_output=True, text=True, timeout=10,
                ).stdout  # fmt: skip
                found = re.search(r" mtu (\d+)", shown)
                mtus[name] = int(found.group(1)) if found else None
            shown = bed.exec(provs[at[0]], "ip", "-o", "link", "show", "dev", ifaces[at[0]]).stdout
            found = re.search(r" mtu (\d+)", shown)
            mtus["node_wireguard"] = int(found.group(1)) if found else None
            size = args.mib << 20
            for name, path in paths.items():
                out = subprocess.run(
                    [*nsenter_net(pids[0]), "ping", "-n", "-c",
                     str(args.pings), "-i", "0.01", "-W", "1", path["to"][0]],
                    capture_output=True, text=True, timeout=60 + args.pings,
                ).stdout  # fmt: skip
                rtts, _ = parse_ping(out)
                samples[name]["ping_ms"] += rtts
                samples[name]["ping_lost"] += args.pings - len(rtts)
            for name, path in paths.items():
                before = node_peer_bytes(at[0])
                cpu_before = [cpu_seconds({"wireguard-go", iface}) for iface in ifaces]
                moved = tcp_transfer(nsenter_net(pids[0]), nsenter_net(pids[1]),
                                     path["to"][0], size)  # fmt: skip
                cpu_after = [cpu_seconds({"wireguard-go", iface}) for iface in ifaces]
                if [n for n, _ in cpu_before + cpu_after] != [1] * 4:
                    raise RuntimeError(f"not one wireguard-go per node: {cpu_before}, {cpu_after}")
                cpu = sum(a[1] - b[1] for a, b in zip(cpu_after, cpu_before, strict=True))
                grew = node_peer_bytes(at[0]) - before
                if moved["received"] != size:
                    raise RuntimeError(f"short transfer on {name}: {moved}")
                if name == "mesh" and grew < size:
                    raise RuntimeError(f"the mesh transfer did not cross the node peer: {grew}")
                if name == "veth" and grew >= size:
                    raise RuntimeError(f"the veth transfer crossed the node peer: {grew}")
                samples[name]["tcp_MBps"].append(moved["MBps"])
                # Both nodes' wireguard-go together: CPU seconds per second of the transfer.
                samples[name]["wireguard_go_cores"].append(cpu / moved["seconds"])
            for name, path in paths.items():
                ranks = []
                port = str(GLOO_PORT + (name == "veth"))  # no TIME_WAIT left from the last
                for rank, (n, cname) in enumerate(zip(at, names, strict=True)):
                    argv = [
                        "nsenter", "-t", str(hosts[n].pid), "--net", "--mount", "podman",
                        *podman_global_args(), "exec", "-e", "OMP_NUM_THREADS=1",
                        "-e", f"GLOO_SOCKET_IFNAME={path['ifname']}", cname, "python3", "-c",
                        ALL_REDUCE, str(rank), "2", path["to"][1], port, args.sizes,
                        str(args.reps),
                    ]  # fmt: skip
                    ranks.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True,
                                                  env=hosts[n].env))  # fmt: skip
                outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
                for mib, seconds in all_reduce_samples(outputs, sizes).items():
                    samples[name]["all_reduce_s"][mib] += seconds
            return {"mtu": mtus, "sandboxes": [box.address for box in boxes]}

        samples: dict[str, dict[str, Any]] = {
            name: {"ping_ms": [], "ping_lost": 0, "tcp_MBps": [], "wireguard_go_cores": [],
                   "all_reduce_s": {mib: [] for mib in sizes}}
            for name in ("mesh", "veth")
        }  # fmt: skip
        floor_s: list[float] = []
        cluster_s: list[float] = []
        warmup: dict[str, float] = {}
        path_info: dict[str, Any] = {}
        for repeat in range(args.repeat + 1):
            floor = single_order()
            cluster_id, ids, ready = cluster_order()
            if repeat == 0:
                warmup = {"order_floor_s": round(floor, 3), "cluster_s": round(ready, 3)}
            else:
                floor_s.append(floor)
                cluster_s.append(ready)
                path_info = measure(ids, samples)
            api("POST", f"/api/v1/clusters/{cluster_id}/stop/", {})
            wait_orders(ids, ("completed",), 120)
        # Every node-to-node peer is job-scoped: none is left once the last order stopped.
        left_node_peers = {
            i: [key for key in bed.exec(provs[i], "wg", "show", ifaces[i], "peers").stdout.split()
                if key in node_keys]
            for i in range(2)
        }  # fmt: skip

    def path_figures(name: str) -> dict[str, Any]:
        s = samples[name]
        return {
            "ping_rtt_ms": {**summary(s["ping_ms"]), "lost": s["ping_lost"]},
            "tcp_MBps": summary(s["tcp_MBps"], 1),
            "tcp_wireguard_go_cpu_cores_busy": summary(s["wireguard_go_cores"], 2),
            "all_reduce_ms": {
                f"{mib}MiB": {
                    **summary([x * 1000 for x in secs], 1),
                    "algbw_MBps_at_p50": round(
                        (mib << 20) / 1e6 / (summary(secs, 6)["p50"] or 1), 1
                    ),
                }
                for mib, secs in s["all_reduce_s"].items()
            },
        }

    mesh, veth = path_figures("mesh"), path_figures("veth")
    floor_ms = [x * 1000 for x in floor_s]
    cluster_ms = [x * 1000 for x in cluster_s]
    result = {
        "benchmark": "mesh_path",
        "host": args.host,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "image": tag,
        "repeat": args.repeat,
        "tcp_bytes_per_transfer": args.mib << 20,
        "pings_per_repeat": args.pings,
        "all_reduce_reps_per_repeat": args.reps,
        "path": path_info,
        "mesh": mesh,
        "veth_baseline": veth,
        "mesh_over_veth_p50": {
            "ping_rtt": round(mesh["ping_rtt_ms"]["p50"] / veth["ping_rtt_ms"]["p50"], 2),
            "tcp_throughput": round(mesh["tcp_MBps"]["p50"] / veth["tcp_MBps"]["p50"], 3),
            **{
                f"all_reduce_{key}": round(row["p50"] / veth["all_reduce_ms"][key]["p50"], 2)
                for key, row in mesh["all_reduce_ms"].items()
            },
        },
        "warmup": warmup,
        "order_floor_one_node_post_to_running_ms": summary(floor_ms, 1),
        "cluster_two_nodes_post_to_every_part_running_ms": summary(cluster_ms, 1),
        "cluster_over_floor_p50": round(summary(cluster_ms)["p50"] / summary(floor_ms)["p50"], 2),
        "node_to_node_peers_left_after_stops": left_node_peers,
    }
    ok = not any(left_node_peers.values())
    return result, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="measured repeats (plus a warm-up)")
    parser.add_argument("--mib", type=int, default=64, help="MiB per TCP transfer")
    parser.add_argument("--pings", type=int, default=100, help="pings per path per repeat")
    parser.add_argument("--sizes", default="4,64", help="all-reduce tensor sizes, MiB")
    parser.add_argument("--reps", type=int, default=5, help="timed all-reduces per size")
    args = parser.parse_args()
    tt.require_root_and_tools()
    for tool in ("podman", "nsenter", "ping", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} on PATH")
    return tt.run_on_a_fresh_database(
        lambda database_url, tmp: run(args, database_url, tmp),
        default_url=DEFAULT_DATABASE_URL,
        redis_db=REDIS_DB,
        prefix="molt-bench-meshpath-",
    )


if __name__ == "__main__":
    sys.exit(main())
