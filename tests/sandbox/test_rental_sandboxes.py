"""Job sandboxes end to end, real parts only: the ASGI server, a Celery worker, Redis and
PostgreSQL in the root namespace; `clawnode join` and `clawnode run --sandbox-engine podman` with
wireguard-go in a provider namespace, running the tier's test image under real rootful podman
with simulated GPUs behind a real CDI spec; two buyers in their own namespaces who add an SSH
key through the API, order a GPU each, apply the downloaded wg-quick config and log in with the
stock OpenSSH client, verifying the host key from the order's known_hosts line. Then: each sees
only its GPU; isolation from the buyers' side and from inside the sandboxes; NAT egress only
where the listing allows it; an OOM kill that stays inside; an SSH session through agent
restarts; an orphan container removed; stop (with the agent up, and down) tearing everything
down and settling; an unpullable image and a container dying mid-job failing their orders.

The agent runs in the provider's network namespace only (nsenter --net), not under `ip netns
exec`: that one gives it a private mount namespace, so the sandbox namespaces it mounts under
/var/run/netns and podman's container mounts would live and die with one agent process, where
on a real host they belong to the machine and outlive an agent restart.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clawnode.sandbox.engine import LABEL_MANAGED, LABEL_REF
from clawnode.sandbox.manager import container_name
from clawnode.sandbox.network import host_veth, netns_name
from django.contrib.auth import get_user_model

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import LedgerEntry, Order, Settlement
from marketplace.tokens import issue_api_token
from meshnet.enrolment import create_enrollment_token
from meshnet.models import Node, Sandbox
from tests.integration.conftest import running_gateway, wait_until
from tests.integration.test_order_provisioning import call
from tests.netns.testbed import network_testbed
from tests.sandbox.conftest import ENGINE_OPTIONS, agent_engine_args, podman_global_args
from tests.sandbox.image import EXPOSED_PORT

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.netns,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
]

BIN = Path(sys.executable).parent
LAN_HOST = "192.168.77.2"
MISSING_IMAGE = "localhost/molt-missing:1"  # offered by the node, in no store, no registry
PROBE_PORT = 2222  # a service on the provider host and on its LAN: no buyer may reach either


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *podman_global_args(), *args],
        capture_output=True, text=True, timeout=120, check=check,
    )  # fmt: skip


def containers_of(ref: str) -> list[str]:
    """Names of every container, running or not, that carries `ref`'s label."""
    out = podman("ps", "-a", "--filter", f"label={LABEL_REF}={ref}", "--format", "{{.Names}}")
    return out.stdout.split()


def namespaces() -> str:
    """`ip netns list` of the machine (where the agent mounts its sandboxes' namespaces)."""
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def fingerprints(path: Path) -> str:
    """The SHA256 fingerprint `ssh-keygen -l` gives the one key in `path`."""
    done = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    return line.split()[1]


def connects(bed, ns: str, address: str, port: int) -> bool:
    """Does a TCP connection from `ns` to address:port complete and get an answer?"""
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    s = socket.create_connection(('{address}', {port}), timeout=2)\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); sys.exit(0 if s.recv(4) else 1)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return bed.exec(ns, sys.executable, "-c", probe, check=False).returncode == 0


def wg_keypair(bed, ns: str) -> tuple[str, str]:
    private = bed.exec(ns, "wg", "genkey").stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


class Buyer:
    """A buyer: their namespace, WireGuard and SSH keys, API token, and (once ordered) the
    order and its sandbox as the API shows it."""

    def __init__(self, bed, gateway, user, ns: str, iface: str, workdir: Path) -> None:
        self.bed, self.gateway, self.ns, self.iface = bed, gateway, ns, iface
        self.dir = workdir / user.username
        self.dir.mkdir()
        self.token = issue_api_token(user)
        self.wg_private, self.wg_public = wg_keypair(bed, ns)
        self.ssh_key = self.dir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", user.username,
             "-f", str(self.ssh_key)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self.order_id = 0
        self.sandbox: dict = {}

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        status, text = call(self.gateway, method, path, self.token, body)
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def add_ssh_key(self) -> None:
        public = (self.ssh_key.parent / "id_ed25519.pub").read_text().strip()
        status, body = self.api(
            "POST", "/api/v1/ssh-keys/", {"name": "laptop", "public_key": public}
        )
        assert status == 201, body
        assert body["fingerprint"] == fingerprints(self.ssh_key.parent / "id_ed25519.pub")

    def order(self, listing, **extra) -> None:
        status, body = self.api(
            "POST", "/api/v1/orders/",
            {"listing": listing.pk, "gpu_count": 1, "hours": 1,
             "wireguard_public_key": self.wg_public, **extra},
        )  # fmt: skip
        assert status == 201, body
        self.order_id = body["id"]

    @property
    def ref(self) -> str:
        return f"order:{self.order_id}"

    def wait_running(self, agent_log: Path) -> None:
        wait_until(
            lambda: Order.objects.filter(pk=self.order_id, state="running").exists(),
            timeout=120,
            interval=0.5,
            message=f"order {self.order_id} to run\n{self.gateway.logs()}\n"
            f"--- agent ---\n{agent_log.read_text()[-4000:]}\n"
            f"sandbox: {Sandbox.objects.filter(ref=self.ref).values().first()}",
        )
        status, body = self.api("GET", f"/api/v1/orders/{self.order_id}/")
        assert status == 200, body
        self.sandbox = body["sandbox"]
        assert self.sandbox["state"] == "ready", self.sandbox
        assert self.sandbox["ports"] == [EXPOSED_PORT], self.sandbox  # the image's EXPOSE
        known_hosts = self.dir / "known_hosts"
        known_hosts.write_text(self.sandbox["known_hosts"] + "\n")
        # What the Connect panel shows to check by eye is what ssh-keygen makes of the line.
        assert self.sandbox["host_key_fingerprints"] == [fingerprints(known_hosts)]

    def tunnel_up(self) -> None:
        """Download wireguard.conf, fill in the private key only the buyer holds, wg-quick up."""
        status, config = call(
            self.gateway, "GET", f"/api/v1/orders/{self.order_id}/wireguard.conf", self.token
        )
        assert status == 200, config
        assert self.wg_private not in config
        assert f"AllowedIPs = {self.sandbox['address']}/32" in config, config
        filled = re.sub(
            r"^# PrivateKey = .*$", f"PrivateKey = {self.wg_private}", config, flags=re.M
        )
        path = self.dir / f"{self.iface}.conf"
        path.write_text(filled)
        path.chmod(0o600)
        self.bed.exec(self.ns, "wg-quick", "up", str(path), timeout=60)

    def tunnel_down(self) -> None:
        self.bed.exec(self.ns, "wg-quick", "down", str(self.dir / f"{self.iface}.conf"),
                      check=False)  # fmt: skip

    def ssh_argv(self, *command: str, address: str | None = None) -> list[str]:
        """The stock client, its host key checked against the order's known_hosts line only."""
        # An address (or a name) given: the order's ssh_command is not needed (a cluster's
        # buyer logs in to several sandboxes).
        target = f"root@{address}" if address else self.sandbox["ssh_command"].split()[-1]
        return [
            "ip", "netns", "exec", self.ns,
            "ssh", "-F", "/dev/null", "-i", str(self.ssh_key),
            "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=2",
            target, *command,
        ]  # fmt: skip

    def ssh(self, *command: str, address: str | None = None, check: bool = True):
        done = subprocess.run(
            self.ssh_argv(*command, address=address), capture_output=True, text=True, timeout=60
        )
        if check:
            assert done.returncode == 0, f"ssh {command}: {done.returncode} {done.stderr}"
        return done


def gpus_seen(buyer: Buyer) -> tuple[set[str], str]:
    """(the /dev/nvidiaN nodes, NVIDIA_VISIBLE_DEVICES) in the buyer's login shell."""
    out = buyer.ssh("ls -1 /dev; echo VISIBLE=$NVIDIA_VISIBLE_DEVICES").stdout
    nodes = {f"/dev/{name}" for name in out.split() if re.fullmatch(r"nvidia\d+", name)}
    visible = re.search(r"^VISIBLE=(.*)$", out, re.M)
    assert visible, out
    return nodes, visible.group(1).strip()


def connects_from_sandbox(buyer: Buyer, address: str, port: int) -> bool:
    """Does a TCP connection from inside the buyer's sandbox (a command over its SSH login)
    to address:port complete and get an answer?"""
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    s = socket.create_connection(('{address}', {port}), timeout=2)\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print('yes' if s.recv(4) else 'no')\n"
        "except OSError:\n"
        "    print('no')\n"
    )
    answer = buyer.ssh(f"python3 -c {shlex.quote(probe)}").stdout.strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


def test_two_buyers_each_log_in_to_their_own_sandbox_with_exactly_their_gpu(tmp_path, settings):
    User = get_user_model()
    provider = User.objects.create_user("bob", password="bob-pass-123")
    alice_user = User.objects.create_user("alice", password="alice-pass-123")
    carol_user = User.objects.create_user("carol", password="carol-pass-123")
    dave_user = User.objects.create_user("dave", password="dave-pass-123")
    from tests.sandbox.image import ensure_image

    image = ensure_image(podman_global_args())
    refs: list[str] = []

    with network_testbed() as bed:
        prov, buy_a, buy_c, lan, inet = (
            bed.namespace(r) for r in ("prov", "bya", "byc", "lan", "inet")
        )
        prov_ip = bed.attach(prov)
        bed.attach(buy_a)
        bed.attach(buy_c)
        inet_ip = bed.attach(inet)  # a host on the internet: nothing routes 10.x back to it
        # The provider's LAN: a host no buyer may reach, routed back through the provider.
        bed.link(prov, "192.168.77.1/24", lan, f"{LAN_HOST}/24", "lan")
        bed.exec(lan, "ip", "route", "add", "10.0.0.0/8", "via", "192.168.77.1")
        prov_if = bed.wireguard_name("p")
        try:
            with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
                # -- the provider joins and runs the agent with podman ---------------------------
                state_dir = tmp_path / "clawnode"
                token = create_enrollment_token(provider).token
                joined = bed.exec(
                    prov, str(BIN / "clawnode"), "join", "--gateway", gateway.base_url,
                    "--insecure", "--token", token, "--state-dir", str(state_dir),
                    "--interface", prov_if, "--endpoint", f"{prov_ip}:51820",
                    "--backend", "userspace", "--simulated-gpus", "RTX 4090:3", timeout=60,
                )  # fmt: skip
                match = re.search(r"(node-\d+) joined the mesh at (10\.100\.\d+\.\d+)",
                                  joined.stdout)  # fmt: skip
                assert match, joined.stdout + joined.stderr
                node = Node.objects.get(name=match.group(1))
                mesh_ip = match.group(2)
                agent_log_path = tmp_path / "agent.log"
                agent_log = open(agent_log_path, "ab")  # noqa: SIM115
                engine_args = agent_engine_args()

                def start_agent() -> subprocess.Popen:
                    proc = subprocess.Popen(
                        ["nsenter", f"--net=/var/run/netns/{prov}",
                         str(BIN / "clawnode"), "run", "--state-dir", str(state_dir),
                         "--simulated-gpus", "RTX 4090:3", "--sandbox-engine", "podman",
                         "--image", image, "--image", MISSING_IMAGE, *engine_args],
                        stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                    bed.processes.append(proc)
                    return proc

                agent = start_agent()
                wait_until(
                    lambda: image in (Node.objects.get(pk=node.pk).images or []),
                    timeout=60,
                    interval=0.5,
                    message=f"the agent to report its image\n{agent_log_path.read_text()}",
                )
                # The provider's own service, on every address of the host, and a LAN host's.
                for ns in (prov, lan, inet):
                    bed.popen(
                        ns, [sys.executable, "-m", "http.server", str(PROBE_PORT),
                             "--bind", "0.0.0.0"],  # noqa: S104
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                wait_until(lambda: connects(bed, prov, LAN_HOST, PROBE_PORT), timeout=20,
                           message="the LAN host's service")  # fmt: skip
                wait_until(lambda: connects(bed, prov, mesh_ip, PROBE_PORT), timeout=20,
                           message="the provider's own service")  # fmt: skip

                # -- sandbox listings of the images the node reports: with egress, without -----
                terms = {"price_per_gpu_hour": 3_600_000, "price_per_gib": 2_000_000,
                         "cpus_per_gpu": 1, "memory_gb_per_gpu": 1, "disk_gb": 5}  # fmt: skip
                listing = create_listing(provider, node=node, gpu_count=2, **terms)
                assert listing.images == [image, MISSING_IMAGE] and listing.egress
                closed = create_listing(
                    provider, node=node, gpu_count=1, images=[image], egress=False, **terms
                )
                for user in (alice_user, carol_user, dave_user):
                    ledger.grant_credits(user, 500_000_000)
                alice = Buyer(bed, gateway, alice_user, buy_a, bed.wireguard_name("a"), tmp_path)
                carol = Buyer(bed, gateway, carol_user, buy_c, bed.wireguard_name("c"), tmp_path)
                dave = Buyer(bed, gateway, dave_user, buy_c, bed.wireguard_name("d"), tmp_path)

                # -- each buyer adds a key, orders a GPU, brings the tunnel up ------------------
                for buyer, offer in ((alice, listing), (carol, closed)):
                    buyer.add_ssh_key()
                    buyer.order(offer)
                    refs.append(buyer.ref)
                for buyer in (alice, carol):
                    buyer.wait_running(agent_log_path)
                    buyer.tunnel_up()
                assert alice.sandbox["address"] != carol.sandbox["address"]

                # -- each logs in and sees exactly its own GPU --------------------------------
                indexes = set()
                for buyer in (alice, carol):
                    assert buyer.ssh("id", "-un").stdout.strip() == "root"
                    (gpu,) = buyer.sandbox["gpus"]
                    indexes.add(gpu["index"])
                    nodes, visible = gpus_seen(buyer)
                    assert nodes == {f"/dev/nvidia{gpu['index']}"}, (buyer.ref, nodes)
                    assert visible == gpu["uuid"], (buyer.ref, visible)
                assert len(indexes) == 2, "two orders on one node got the same GPU"

                # -- names: inside, each resolves its own sandbox by name, not the other's -------
                for buyer, other in ((alice, carol), (carol, alice)):
                    own = buyer.ssh(f"getent ahostsv4 order-{buyer.order_id}-0").stdout.split()
                    assert own[:1] == [buyer.sandbox["address"]], own  # docs/names.md
                    theirs = buyer.ssh(f"getent ahostsv4 order-{other.order_id}-0", check=False)
                    assert theirs.returncode != 0 and not theirs.stdout, theirs.stdout

                # -- an image that cannot be pulled fails the order and releases the hold -------
                dave.add_ssh_key()
                before = ledger.available_for(dave_user)
                dave.order(listing, image=MISSING_IMAGE)
                refs.append(dave.ref)
                failed = wait_until(
                    lambda: Order.objects.filter(pk=dave.order_id, state="failed").first(),
                    timeout=120, interval=0.5,
                    message=f"the unpullable order to fail\n{agent_log_path.read_text()[-3000:]}",
                )  # fmt: skip
                assert "pull" in failed.reason, failed.reason
                assert ledger.available_for(dave_user) == before
                assert ledger.held_for(dave_user) == 0
                assert containers_of(dave.ref) == []
                wait_until(
                    lambda: dave.wg_public
                    not in bed.exec(prov, "wg", "show", prov_if, "peers").stdout,
                    timeout=30, message="the failed order's peer to go",
                )  # fmt: skip

                # -- isolation: each widens its AllowedIPs and routes; the provider drops -------
                for buyer, other in ((alice, carol), (carol, alice)):
                    bed.exec(buyer.ns, "wg", "set", buyer.iface, "peer",
                             node.wireguard_public_key, "allowed-ips",
                             "10.0.0.0/8,192.168.77.0/24")  # fmt: skip
                    bed.exec(buyer.ns, "ip", "route", "add", "10.0.0.0/8", "dev", buyer.iface)
                    bed.exec(buyer.ns, "ip", "route", "add", "192.168.77.0/24", "dev",
                             buyer.iface)  # fmt: skip
                    theirs = other.sandbox["address"]
                    assert connects(bed, buyer.ns, buyer.sandbox["address"], 22)
                    assert not connects(bed, buyer.ns, theirs, 22), "reached another's sandbox"
                    # Not even with the other's host key and the buyer's own key: no packet
                    # reaches the other's sshd.
                    assert buyer.ssh("true", address=theirs, check=False).returncode != 0
                    assert not connects(bed, buyer.ns, mesh_ip, PROBE_PORT), "reached the host"
                    assert not connects(bed, buyer.ns, "192.168.77.1", PROBE_PORT), (
                        "reached the host's LAN address"
                    )
                    assert not connects(bed, buyer.ns, LAN_HOST, PROBE_PORT), "reached a LAN host"

                # -- from inside: the internet through NAT, nothing of the provider's --------
                assert connects_from_sandbox(alice, inet_ip, PROBE_PORT), "no egress through NAT"
                assert not connects_from_sandbox(carol, inet_ip, PROBE_PORT), (
                    "a sandbox of a listing without egress reached the internet"
                )
                assert not connects_from_sandbox(alice, carol.sandbox["address"], 22)
                assert not connects_from_sandbox(alice, mesh_ip, PROBE_PORT), "reached the host"
                assert not connects_from_sandbox(alice, prov_ip, PROBE_PORT), "reached the host"
                assert not connects_from_sandbox(alice, LAN_HOST, PROBE_PORT), "reached the LAN"

                # -- past the memory limit (1 GB for one GPU) the job is killed, not the box ---
                oom = alice.ssh(
                    "python3 -c 'b = bytearray(1536 * 1024 * 1024)'; echo status=$?"
                ).stdout
                assert "status=137" in oom, oom  # SIGKILL from the container's OOM killer
                assert alice.ssh("echo", "alive").stdout.strip() == "alive"

                # -- an agent restart leaves the open SSH session alone -------------------------
                session = subprocess.Popen(
                    alice.ssh_argv("echo open; cat"),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                assert session.stdout is not None and session.stdin is not None
                assert session.stdout.readline().strip() == "open"
                # An orphan: a managed container of an order the gateway does not know.
                orphan_ref = "order:999999"
                orphan = container_name(orphan_ref)
                podman("rm", "-f", orphan, check=False)
                podman("run", "-d", "--name", orphan, "--label", f"{LABEL_MANAGED}=1",
                       "--label", f"{LABEL_REF}={orphan_ref}", "--network", "none",
                       *[arg for name, value in dict(ENGINE_OPTIONS["ulimits"]).items()  # type: ignore[call-overload]
                         for arg in ("--ulimit", f"{name}={value}:{value}")],
                       image, "sleep", "infinity")  # fmt: skip
                agent.send_signal(signal.SIGKILL)
                agent.wait(timeout=20)
                session.stdin.write("still there\n")
                session.stdin.flush()
                assert session.stdout.readline().strip() == "still there"
                seen_before = Node.objects.get(pk=node.pk).last_seen_at
                agent = start_agent()
                wait_until(
                    lambda: not containers_of(orphan_ref), timeout=60, interval=0.5,
                    message=f"the orphan's removal\n{agent_log_path.read_text()[-3000:]}",
                )  # fmt: skip
                wait_until(
                    lambda: Node.objects.get(pk=node.pk).last_seen_at != seen_before,
                    timeout=30, message="the restarted agent to connect",
                )  # fmt: skip
                log = agent_log_path.read_text()
                assert f"removing orphan sandbox container {orphan}" in log
                assert f"sandbox {alice.ref} found after restart: ready" in log
                session.stdin.write("after the restart\n")
                session.stdin.flush()
                assert session.stdout.readline().strip() == "after the restart"
                for buyer in (alice, carol):
                    box = Sandbox.objects.get(ref=buyer.ref)
                    assert box.state == "ready", (box.state, box.detail)
                    assert Order.objects.get(pk=buyer.order_id).state == "running"
                assert carol.ssh("echo", "hi").stdout.strip() == "hi"
                # The restarted agent confines the peers as before.
                assert not connects(bed, alice.ns, carol.sandbox["address"], 22)
                assert not connects(bed, alice.ns, LAN_HOST, PROBE_PORT)

                # -- stop: the session ends, the container, namespace and peer go, it settles --
                status, body = alice.api("POST", f"/api/v1/orders/{alice.order_id}/stop/", {})
                assert status == 200, body
                done = wait_until(
                    lambda: Order.objects.filter(pk=alice.order_id, state="completed").first(),
                    timeout=60,
                    interval=0.5,
                    message=f"the stop to complete\n{agent_log_path.read_text()[-3000:]}",
                )
                session.wait(timeout=30)  # the session ends with the container
                assert containers_of(alice.ref) == []
                # The agent removes container and network before the peer, whose removal ack
                # completes the order: both are gone by now.
                assert netns_name(alice.ref) not in namespaces()
                assert host_veth(alice.ref) not in bed.exec(prov, "ip", "link").stdout
                peers = bed.exec(prov, "wg", "show", prov_if, "peers").stdout.split()
                assert alice.wg_public not in peers
                assert carol.wg_public in peers
                assert alice.ssh("true", check=False).returncode != 0
                status, body = alice.api("GET", f"/api/v1/orders/{alice.order_id}/")
                assert (status, body["state"], body["sandbox"]["state"]) == (
                    200, "completed", "stopped"
                ), body  # fmt: skip
                assert carol.ssh("echo", "hi").stdout.strip() == "hi", "carol's job is untouched"

                settlement = Settlement.objects.get(order_id=alice.order_id)
                assert settlement.captured + settlement.released == done.hold_amount
                assert settlement.fee + settlement.provider_amount == settlement.captured
                legs = list(
                    LedgerEntry.objects.filter(transaction=settlement.transaction).values_list(
                        "account__kind", "amount"
                    )
                )
                assert sum(amount for _, amount in legs) == 0
                assert ("escrow", -done.hold_amount) in legs

                # -- a stop while the agent is down: the agent tears it down when it is back ----
                dave.wg_private, dave.wg_public = wg_keypair(bed, buy_c)
                dave.order(listing)
                refs.append(dave.ref)
                dave.wait_running(agent_log_path)
                agent.send_signal(signal.SIGKILL)
                agent.wait(timeout=20)
                status, body = dave.api("POST", f"/api/v1/orders/{dave.order_id}/stop/", {})
                assert status == 200, body
                assert containers_of(dave.ref) == [container_name(dave.ref)]  # nobody to stop it
                agent = start_agent()
                stopped = wait_until(
                    lambda: Order.objects.filter(pk=dave.order_id, state="completed").first(),
                    timeout=60, interval=0.5,
                    message=f"the stop to complete once the agent is back\n{gateway.logs()}",
                )  # fmt: skip
                assert containers_of(dave.ref) == []
                assert netns_name(dave.ref) not in namespaces()
                assert dave.wg_public not in bed.exec(prov, "wg", "show", prov_if, "peers").stdout
                paid = Settlement.objects.get(order_id=dave.order_id)
                assert paid.captured + paid.released == stopped.hold_amount
                assert carol.ssh("echo", "hi").stdout.strip() == "hi", "carol's job is untouched"

                # -- a clean agent stop leaves the running sandbox alone too -------------------
                agent.send_signal(signal.SIGTERM)
                assert agent.wait(timeout=30) == 0
                assert containers_of(carol.ref) == [container_name(carol.ref)]
                assert carol.ssh("echo", "hi").stdout.strip() == "hi"
                agent = start_agent()
                # Killed once the agent has adopted it: the running agent's own check finds it.
                wait_until(
                    lambda: agent_log_path.read_text().count(
                        f"sandbox {carol.ref} found after restart: ready"
                    )
                    == 2,
                    timeout=30, message="the agent to adopt the sandbox again",
                )  # fmt: skip

                # -- a container that dies mid-job fails its order, billed up to the report ----
                podman("kill", container_name(carol.ref))
                ended = wait_until(
                    lambda: Order.objects.filter(pk=carol.order_id, state="failed").first(),
                    timeout=60, interval=0.5,
                    message=f"the dead sandbox's order to fail\n{agent_log_path.read_text()}",
                )  # fmt: skip
                assert "sandbox failed" in ended.reason, ended.reason
                status, body = carol.api("GET", f"/api/v1/orders/{carol.order_id}/")
                assert body["sandbox"]["state"] == "failed", body
                assert "exit code" in body["sandbox"]["detail"], body  # why, for the buyer
                settled = Settlement.objects.get(order_id=carol.order_id)
                assert settled.captured + settled.released == ended.hold_amount
                assert settled.fee + settled.provider_amount == settled.captured
                wait_until(
                    lambda: carol.wg_public
                    not in bed.exec(prov, "wg", "show", prov_if, "peers").stdout
                    and netns_name(carol.ref) not in namespaces()
                    and not containers_of(carol.ref),
                    timeout=30, message="the dead sandbox's peer, namespace and container to go",
                )  # fmt: skip
                agent.send_signal(signal.SIGTERM)
                assert agent.wait(timeout=30) == 0
                for buyer in (alice, carol):
                    buyer.tunnel_down()
        finally:
            # Containers are not the agent's children: whatever the test did, remove them and
            # their namespaces before the testbed goes.
            for ref in [*refs, "order:999999"]:
                podman("rm", "-f", "-t", "0", container_name(ref), check=False)
                subprocess.run(["ip", "netns", "del", netns_name(ref)], capture_output=True)
