"""Issue 16's proof, the `mesh` tier: a real collective across three nodes of one order.

Real parts only: the ASGI server, a Celery worker, Redis and PostgreSQL in the root namespace;
three providers' nodes, each `clawnode join` and `clawnode run --sandbox-engine podman` with
wireguard-go in a namespace of its own, the third behind a NAT (a router namespace with the NAT
lab's full-cone ruleset, tests/nat/lab.py: it declares no endpoint, so the others and the buyer
reach it at the mapping of its WireGuard port, opened by its own outbound keepalives). A buyer
orders one GPU on each node through /api/v1/clusters/ with the mesh tier's image (the sandbox
tier's plus Debian's python3-torch, tests/sandbox/image.py), brings up the cluster's ONE
wg-quick file, resolves the three sandboxes by name through the responder it names (its
resolv.conf as wg-quick's ``DNS =`` would make it) and logs in to each by name with the stock
ssh, host keys checked against the order's known_hosts lines. Over those logins the three
sandboxes run a torch.distributed all-reduce with the gloo backend (world size 3, the
rendezvous at the first sandbox's name, resolved inside by its node's responder), and each
checks the sum. A second buyer's order on the same three nodes shares their node-to-node peers:
its sandboxes reach each other across the nodes and none of the first order's. Stopping the
first order takes its addresses out of every node-to-node peer; stopping the second removes
every node-to-node peer from every node's wireguard-go.

Three nodes on one machine share what three machines would not: podman's store and
/var/run/netns, where each agent would take the others' containers and namespaces for orphans
and remove them. So each node is a `Host`: its network namespace, a mount namespace of its own
with a tmpfs on /var/run/netns (its sandboxes' namespaces), and a podman store of its own that
reads the machine's images (`additionalimagestores`). Podman's mounts then live in the agent's
mount namespace; no agent is restarted here (tests/sandbox/test_rental_sandboxes.py, with one
node, keeps the machine's and restarts it).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from clawnode.sandbox.engine import LABEL_MANAGED
from clawnode.sandbox.manager import container_name
from clawnode.sandbox.network import netns_name
from django.contrib.auth import get_user_model

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from meshnet.enrolment import create_enrollment_token
from meshnet.models import Node, Sandbox
from tests.integration.conftest import running_gateway, wait_until
from tests.integration.test_order_provisioning import call
from tests.nat.lab import FULL_CONE
from tests.netns.test_names_resolution import getent, resolv_conf
from tests.netns.testbed import network_testbed
from tests.sandbox import image
from tests.sandbox.conftest import agent_engine_args, podman_global_args
from tests.sandbox.test_rental_sandboxes import Buyer, connects

pytestmark = [pytest.mark.mesh, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

BIN = Path(sys.executable).parent
LAN = "192.168.1"  # the NATed node's home LAN, behind its router
WORLD = 3
N = 1 << 18  # floats per rank: 1 MiB each way, exactly representable sums (< 2**24)

# Run in each sandbox over the buyer's ssh login: rank r contributes (r + 1) * arange(N), so the
# sum is 6 * arange(N) element for element (1 + 2 + 3). The rendezvous is the first sandbox's
# name; gloo's own connections go over eth0, the sandbox's one interface besides lo.
ALL_REDUCE = f"""
import datetime, sys, torch, torch.distributed as dist
rank, master = int(sys.argv[1]), sys.argv[2]
assert dist.is_gloo_available()
dist.init_process_group("gloo", init_method=f"tcp://{{master}}:29500", rank=rank,
                        world_size={WORLD}, timeout=datetime.timedelta(seconds=90))
t = torch.arange({N}, dtype=torch.float32) * (rank + 1)
dist.all_reduce(t)
want = torch.arange({N}, dtype=torch.float32) * {sum(range(1, WORLD + 1))}
print("ALLREDUCE", rank, dist.get_backend(), torch.equal(t, want), float(t[-1]), flush=True)
dist.destroy_process_group()
"""


class Host:
    """One provider node's machine: its network namespace, and once its agent runs, the agent's
    mount namespace (its own /var/run/netns) and podman store. `exec(ns, ...)` runs in a
    sandbox namespace of this node, as `Testbed.exec` does in the testbed's (so the sandbox
    tier's probes take it)."""

    def __init__(self, ns: str, workdir: Path) -> None:
        self.ns, self.pid = ns, 0
        store = workdir / f"podman-{ns}"
        store.mkdir()
        (store / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\n'
            f'graphroot = "{store}/root"\nrunroot = "{store}/run"\n'
            '[storage.options]\nadditionalimagestores = ["/var/lib/containers/storage"]\n'
        )
        (store / "containers.conf").write_text(f'[engine]\ntmp_dir = "{store}/tmp"\n')
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(store / "storage.conf"),
            "CONTAINERS_CONF": str(store / "containers.conf"),
        }

    def start_agent(self, bed, argv: list[str], log) -> None:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.ns}", "unshare", "--mount",
             "--propagation", "slave", "sh", "-c",
             'mount -t tmpfs molt-netns /var/run/netns && exec "$@"', "sh", *argv],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
        )  # fmt: skip
        bed.processes.append(proc)
        self.pid = proc.pid  # nsenter, unshare and sh exec: the agent keeps the pid

    def run(self, *args: str, check: bool = True, timeout: float = 60):
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "--net", "--mount", *args],
            capture_output=True, text=True, timeout=timeout, env=self.env,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"{args}: {done.stderr}"
        return done

    def exec(self, ns: str, *args: str, check: bool = True, timeout: float = 30):
        return self.run("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)

    def podman(self, *args: str, check: bool = True):
        return self.run("podman", *podman_global_args(), *args, check=check, timeout=120)

    def remove_sandboxes(self) -> None:
        if self.pid and os.path.exists(f"/proc/{self.pid}"):
            found = self.podman("ps", "-aq", "--filter", f"label={LABEL_MANAGED}", check=False)
            for container in found.stdout.split():
                self.podman("rm", "-f", "-t", "0", container, check=False)


def mesh_peers(bed, ns: str, iface: str, node_keys: set[str]) -> dict[str, set[str]]:
    """This node's node-to-node peers as its wireguard-go has them: {key: allowed /32s}."""
    peers: dict[str, set[str]] = {}
    for line in bed.exec(ns, "wg", "show", iface, "allowed-ips").stdout.splitlines():
        key, _, ips = line.partition("\t")
        if key in node_keys:
            peers[key] = set(ips.split()) - {"(none)"}
    return peers


def nat_router(bed, role: str, node_role: str) -> tuple[str, str, str]:
    """A home router on the bridge and a node behind it on LAN 192.168.1.0/24, the router's
    ruleset the NAT lab's full cone. Returns (router ns, its public address, the node's ns)."""
    router, node = bed.namespace(role), bed.namespace(node_role)
    public = bed.attach(router)
    wan = bed.exec(router, "ip", "-o", "addr", "show", "to", public).stdout.split()[1]
    bed.link(router, f"{LAN}.1/24", node, f"{LAN}.2/24", "nat")
    lan = bed.exec(router, "ip", "-o", "addr", "show", "to", f"{LAN}.1").stdout.split()[1]
    bed.exec(node, "ip", "route", "add", "default", "via", f"{LAN}.1")
    bed.exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ruleset = FULL_CONE.ruleset(
        wan=wan, lan=lan, lan_net=f"{LAN}.0/24", public_ip=public, hosts=[f"{LAN}.2"]
    )
    subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=ruleset,
                   text=True, check=True, capture_output=True, timeout=30)  # fmt: skip
    return router, public, node


def test_three_nodes_one_behind_a_nat_run_a_gloo_all_reduce_over_the_mesh(tmp_path, settings):
    User = get_user_model()
    owners = [User.objects.create_user(f"prov{i}", password="prov-pass-123") for i in range(3)]
    alice_user = User.objects.create_user("alice", password="alice-pass-123")
    dave_user = User.objects.create_user("dave", password="dave-pass-123")
    torch_image = image.ensure_image(podman_global_args(), image.TORCH)
    made: list[Path] = []

    with network_testbed() as bed:
        provs = [bed.namespace("pa"), bed.namespace("pb")]
        endpoints = [f"{bed.attach(ns)}:51820" for ns in provs]
        _, router_ip, behind = nat_router(bed, "rt", "pc")
        provs.append(behind)
        endpoints.append("")  # behind the NAT: nothing to declare, the gateway sees the router
        buy_a, buy_d = bed.namespace("bya"), bed.namespace("byd")
        bed.attach(buy_a)
        bed.attach(buy_d)
        ifaces = [bed.wireguard_name(f"w{i}") for i in range(3)]
        hosts = [Host(ns, tmp_path) for ns in provs]
        try:
            with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
                # -- three nodes join and run the agent with podman and the torch image ----------
                nodes: list[Node] = []
                for i, (ns, iface, owner) in enumerate(zip(provs, ifaces, owners, strict=True)):
                    state_dir = tmp_path / f"clawnode-{i}"
                    declared = ["--endpoint", endpoints[i]] if endpoints[i] else []
                    joined = bed.exec(
                        ns, str(BIN / "clawnode"), "join", "--gateway", gateway.base_url,
                        "--insecure", "--token", create_enrollment_token(owner).token,
                        "--state-dir", str(state_dir), "--interface", iface, *declared,
                        "--backend", "userspace", "--simulated-gpus", "RTX 4090:2", timeout=60,
                    )  # fmt: skip
                    match = re.search(r"(node-\d+) joined the mesh", joined.stdout)
                    assert match, joined.stdout + joined.stderr
                    nodes.append(Node.objects.get(name=match.group(1)))
                    log = open(tmp_path / f"agent-{i}.log", "ab")  # noqa: SIM115
                    hosts[i].start_agent(
                        bed,
                        [str(BIN / "clawnode"), "run", "--state-dir", str(state_dir),
                         "--simulated-gpus", "RTX 4090:2", "--sandbox-engine", "podman",
                         "--image", torch_image, *agent_engine_args()],
                        log,
                    )  # fmt: skip

                def agent_logs() -> str:
                    return "".join(
                        f"--- agent {i} ---\n{(tmp_path / f'agent-{i}.log').read_text()[-3000:]}\n"
                        for i in range(3)
                    )

                for node in nodes:
                    wait_until(
                        lambda pk=node.pk: torch_image in (Node.objects.get(pk=pk).images or []),
                        timeout=60, interval=0.5,
                        message=f"the agents to report the image\n{agent_logs()}",
                    )  # fmt: skip
                # The gateway saw the NATed node come from its router, and offers that.
                assert Node.objects.get(pk=nodes[2].pk).endpoint == f"{router_ip}:51820"
                terms = {"price_per_gpu_hour": 3_600_000, "price_per_gib": 2_000_000,
                         "cpus_per_gpu": 1, "memory_gb_per_gpu": 2, "disk_gb": 5}  # fmt: skip
                listings = [
                    create_listing(owner, node=node, gpu_count=2, **terms)
                    for owner, node in zip(owners, nodes, strict=True)
                ]
                for user in (alice_user, dave_user):
                    ledger.grant_credits(user, 500_000_000)
                alice = Buyer(bed, gateway, alice_user, buy_a, bed.wireguard_name("a"), tmp_path)
                dave = Buyer(bed, gateway, dave_user, buy_d, bed.wireguard_name("d"), tmp_path)

                # -- each buyer orders one GPU on each of the three nodes ------------------------
                clusters: dict[str, int] = {}
                for buyer in (alice, dave):
                    buyer.add_ssh_key()
                    status, body = buyer.api(
                        "POST", "/api/v1/clusters/",
                        {"parts": [{"listing": lst.pk, "gpu_count": 1} for lst in listings],
                         "hours": 1, "on_part_loss": "end",
                         "wireguard_public_key": buyer.wg_public},
                    )  # fmt: skip
                    assert status == 201, body
                    clusters[buyer.ns] = body["id"]
                parts: dict[str, list[Sandbox]] = {}
                for buyer in (alice, dave):
                    cluster_id = clusters[buyer.ns]
                    # Until every part runs or one has ended (a failed part ends the order).
                    wait_until(
                        lambda cluster_id=cluster_id: not Order.objects.filter(
                            cluster_id=cluster_id, state__in=("pending", "provisioning")
                        ).exists(),
                        timeout=240, interval=1,
                        message=f"every part to run\n{gateway.logs()}\n{agent_logs()}",
                    )  # fmt: skip
                    orders = Order.objects.filter(cluster_id=cluster_id).order_by("pk")
                    assert {o.state for o in orders} == {"running"}, (
                        [(o.state, o.reason) for o in orders],
                        [(b.ref, b.state, b.detail) for b in Sandbox.objects.all()],
                        agent_logs(),
                    )
                    boxes = [Sandbox.objects.get(ref=f"order:{o.pk}") for o in orders]
                    assert [box.node_id for box in boxes] == [n.pk for n in nodes]
                    assert all(box.state == "ready" for box in boxes), [b.state for b in boxes]
                    parts[buyer.ns] = boxes
                mine, theirs = parts[alice.ns], parts[dave.ns]
                names = [f"order-{box.ref.split(':')[1]}-0" for box in mine]
                node_keys = {node.wireguard_public_key for node in nodes}

                # -- the buyer's one tunnel: every sandbox by name --------------------------------
                status, config = call(
                    gateway, "GET", f"/api/v1/clusters/{clusters[alice.ns]}/wireguard.conf",
                    alice.token,
                )  # fmt: skip
                assert status == 200, config
                assert config.count("[Interface]") == 1 and config.count("[Peer]") == WORLD
                dns = re.search(r"^# DNS = ([\d.]+), molt$", config, re.M)
                assert dns, config
                resolv_conf(alice.ns, dns.group(1), made)  # what wg-quick's DNS line makes
                filled = re.sub(
                    r"^# PrivateKey = .*$", f"PrivateKey = {alice.wg_private}", config, flags=re.M
                )
                path = alice.dir / f"{alice.iface}.conf"
                path.write_text(filled)
                path.chmod(0o600)
                bed.exec(alice.ns, "wg-quick", "up", str(path), timeout=60)
                # Known hosts by name and address, each from its part's order (the buyer labels
                # the lines with the names they will type).
                lines = []
                for box, name in zip(mine, names, strict=True):
                    status, body = alice.api("GET", f"/api/v1/orders/{box.ref.split(':')[1]}/")
                    assert status == 200, body
                    for line in body["sandbox"]["known_hosts"].splitlines():
                        lines.append(line.replace(box.address, f"{name},{box.address}", 1))
                (alice.dir / "known_hosts").write_text("\n".join(lines) + "\n")
                for box, name in zip(mine, names, strict=True):
                    assert getent(bed, alice.ns, name) == box.address, name
                    hostname = alice.ssh("cat /proc/sys/kernel/hostname", address=name)
                    assert hostname.returncode == 0
                # The NATed node is reached through its router's mapping, not its LAN address.
                for ns, iface in zip(provs[:2], ifaces[:2], strict=True):
                    ends = bed.exec(ns, "wg", "show", iface, "endpoints").stdout
                    assert f"{nodes[2].wireguard_public_key}\t{router_ip}:" in ends, ends

                # -- the collective: a gloo all-reduce across the three sandboxes ----------------
                command = "OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=eth0 python3 -c " + shlex.quote(
                    ALL_REDUCE
                )
                runs = [
                    subprocess.Popen(
                        alice.ssh_argv(f"{command} {rank} {names[0]}", address=name),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for rank, name in enumerate(names)
                ]
                for rank, run in enumerate(runs):
                    out, err = run.communicate(timeout=240)
                    assert run.returncode == 0, f"rank {rank}: {out}\n{err}"
                    expected = f"ALLREDUCE {rank} gloo True {float((N - 1) * 6)}"
                    assert expected in out, out + err

                # -- another order on the same nodes: its own members only ----------------------
                for box in theirs[1:]:  # the control: the probe gets through where it may
                    assert connects(hosts[0], netns_name(theirs[0].ref), box.address, 22)
                for host, other in zip(hosts, theirs, strict=True):
                    for box in mine:
                        assert not connects(host, netns_name(other.ref), box.address, 22), (
                            f"{other.ref} reached {box.ref}"
                        )
                    # Nor does it resolve any of the first order's names.
                    for name in names:
                        found = host.podman("exec", container_name(other.ref), "getent",
                                            "hosts", name, check=False)  # fmt: skip
                        assert found.returncode != 0 and not found.stdout, found.stdout

                # -- stop: the first order's addresses leave every peer, then every peer goes ---
                before = {
                    ns: mesh_peers(bed, ns, iface, node_keys)
                    for ns, iface in zip(provs, ifaces, strict=True)
                }
                assert all(len(peers) == WORLD - 1 for peers in before.values()), before
                for buyer in (alice, dave):
                    cluster_id = clusters[buyer.ns]
                    status, body = buyer.api("POST", f"/api/v1/clusters/{cluster_id}/stop/", {})
                    assert status == 200, body
                    wait_until(
                        lambda cluster_id=cluster_id: not Order.objects.filter(
                            cluster_id=cluster_id
                        ).exclude(state="completed").exists(),
                        timeout=90, interval=0.5,
                        message=f"every part to complete\n{gateway.logs()}\n{agent_logs()}",
                    )  # fmt: skip
                    gone = {f"{box.address}/32" for box in parts[buyer.ns]}
                    for ns, iface in zip(provs, ifaces, strict=True):
                        peers = mesh_peers(bed, ns, iface, node_keys)
                        assert not any(gone & ips for ips in peers.values()), peers
                        if buyer is alice:  # the other order still holds the same peers
                            assert len(peers) == WORLD - 1, peers
                        else:
                            assert peers == {}, f"node-to-node peers left on {ns}: {peers}"
                for ns, iface in zip(provs, ifaces, strict=True):
                    assert mesh_peers(bed, ns, iface, node_keys) == {}
                alice.tunnel_down()
        finally:
            # Containers are not the agents' children: whatever the test did, remove them and
            # their namespaces before the testbed goes.
            # Their namespaces are the agents' mounts: they go with the agents' mount
            # namespaces when the testbed ends the agents.
            for host in hosts:
                host.remove_sandboxes()
            for folder in made:
                subprocess.run(["rm", "-rf", str(folder)], check=False)
