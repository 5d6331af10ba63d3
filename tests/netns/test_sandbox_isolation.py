"""Job sandbox isolation with real packets, without a container engine: the provider's sandbox
namespaces are made by clawnode.sandbox.network (through its pyroute2 child, as the agent makes
them), the table by clawnode.firewall from a signed-shape desired state (the daemon's own
translation, firewall.sandbox_rules), the tunnels by real wireguard-go. A TCP listener inside
each sandbox namespace stands in for its sshd.

Topology (testbed.py): provider, two buyers and an "internet" host on the bridge
(198.51.100.0/24); the provider's LAN on 192.168.77.0/24, routed back through the provider.
Each buyer widens its own AllowedIPs and routes to everything it should not reach, so only the
provider's rules stop it; at the end the table is deleted and the same probes get through,
so the rules, not the topology, are what stopped them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clawnode import wire
from clawnode.firewall import render_ruleset, sandbox_rules
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair
from clawnode.sandbox.network import host_veth, netns_name

from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns]

MESH_IP = "10.100.128.1"
JOB_NETWORK = "10.64.0.0/11"  # buyers' job tunnel addresses (ipplan "jobs"): not on-link
ANY = "0.0.0.0"  # noqa: S104 (every address of a test namespace: that is the point)
PORT = 2222  # the sandboxes' stand-in sshd, and the host's own service
SANDBOX_NET_DRIVER = """
import sys
from clawnode.sandbox.network import NetnsSandboxNetwork
net = NetnsSandboxNetwork()
op = sys.argv[1]
if op == "setup":
    print(net.setup(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"))
elif op == "teardown":
    net.teardown(sys.argv[2])
else:
    print(" ".join(sorted(net.present())))
"""


def keypair() -> tuple[str, str]:
    private, public = generate_wireguard_keypair()
    return encode_key(private), encode_key(public)


def in_provider(prov: str, *args: str) -> str:
    """Run the agent's sandbox network calls in the provider's network namespace only (its
    mount namespace stays the machine's, where /var/run/netns is)."""
    done = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{prov}", sys.executable, "-c", SANDBOX_NET_DRIVER,
         *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def connects(bed, ns: str, address: str, port: int = PORT) -> bool:
    """Does a TCP connection from `ns` to address:port complete (and get the listener's
    answer)?"""
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    s = socket.create_connection(('{address}', {port}), timeout=2)\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); sys.exit(0 if s.recv(4) else 1)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return bed.exec(ns, sys.executable, "-c", probe, check=False).returncode == 0


def listen(bed, ns: str, address: str, port: int = PORT) -> None:
    bed.popen(
        ns, [sys.executable, "-m", "http.server", str(port), "--bind", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_listening(bed, ns: str, address: str, port: int = PORT) -> None:
    deadline = time.monotonic() + 20
    while not connects(bed, ns, address, port):
        assert time.monotonic() < deadline, f"nothing listens on {address}:{port} in {ns}"
        time.sleep(0.2)


def drop_counts(bed, ns: str) -> dict[str, int]:
    listing = bed.exec(ns, "nft", "list", "table", "inet", "clawnode").stdout
    return {
        m.group(1).strip(): int(m.group(2))
        for m in re.finditer(r"^\s*(.*?) counter packets (\d+) bytes \d+ drop$", listing, re.M)
    }


def wireguard(bed, ns, name, private, address, tmp: Path, peers, port=None) -> None:
    """wireguard-go interface `name` in `ns` with `address` and `peers`: [(key, allowed,
    endpoint)]."""
    key_file = tmp / f"{name}.key"
    key_file.write_text(private + "\n")
    key_file.chmod(0o600)
    bed.exec(ns, "wireguard-go", name)
    command = ["wg", "set", name, "private-key", str(key_file)]
    if port:
        command += ["listen-port", str(port)]
    for key, allowed, endpoint in peers:
        command += ["peer", key, "allowed-ips", allowed]
        if endpoint:
            command += ["endpoint", endpoint, "persistent-keepalive", "5"]
    bed.exec(ns, *command)
    bed.exec(ns, "ip", "addr", "add", address, "dev", name)
    bed.exec(ns, "ip", "link", "set", name, "up")


def test_each_buyer_reaches_its_own_sandbox_only_and_sandboxes_reach_only_the_internet(tmp_path):
    node = Identity.from_seed(bytes(range(32)))
    suffix = f"{os.getpid() % 100000}"
    ref_a, ref_b = f"order:{suffix}1", f"order:{suffix}2"
    box_a, box_b = "10.128.0.33", "10.128.0.34"
    buyer_a_ip, buyer_b_ip = "10.64.0.7", "10.64.0.8"  # the gateway's job block
    with network_testbed() as bed:
        prov, buy_a, buy_b, inet, lan = (
            bed.namespace(r) for r in ("prov", "bya", "byb", "inet", "lan")
        )
        prov_ip = bed.attach(prov)
        bed.attach(buy_a)
        bed.attach(buy_b)
        inet_ip = bed.attach(inet)  # a host on the internet: nothing routes 10.x back to it
        bed.link(prov, "192.168.77.1/24", lan, "192.168.77.2/24", "lan")
        bed.exec(lan, "ip", "route", "add", "10.0.0.0/8", "via", "192.168.77.1")
        try:
            # -- the provider: its tunnel, its own service on every address -----------------
            prov_if, a_if, b_if = (bed.wireguard_name(r) for r in ("p", "a", "b"))
            prov_key, a_key, b_key = keypair(), keypair(), keypair()
            wireguard(bed, prov, prov_if, prov_key[0], f"{MESH_IP}/17", tmp_path,
                      [(a_key[1], f"{buyer_a_ip}/32", ""), (b_key[1], f"{buyer_b_ip}/32", "")],
                      port=51820)  # fmt: skip
            # The agent's own link set-up (backends.links, as ensure_interface runs it): the job
            # block routed onto the interface, since buyers' addresses are not on-link.
            configure = (sys.executable, "-m", "clawnode.backends.links", "configure", prov_if,
                         f"{MESH_IP}/17", JOB_NETWORK)  # fmt: skip
            bed.exec(prov, *configure)
            # Each buyer routes everything it could try through its tunnel.
            for ns, name, key, ip in ((buy_a, a_if, a_key, buyer_a_ip),
                                      (buy_b, b_if, b_key, buyer_b_ip)):  # fmt: skip
                tunnel = (prov_key[1], "10.0.0.0/8,192.168.77.0/24", f"{prov_ip}:51820")
                wireguard(bed, ns, name, key[0], f"{ip}/32", tmp_path, [tunnel])
                bed.exec(ns, "ip", "route", "add", "10.0.0.0/8", "dev", name)
                bed.exec(ns, "ip", "route", "add", "192.168.77.0/24", "dev", name)
            listen(bed, prov, ANY)  # the provider's own service: nobody here may reach it
            listen(bed, lan, ANY)
            listen(bed, inet, ANY)
            listen(bed, buy_a, buyer_a_ip)  # a buyer's own service: a sandbox may not call it

            # -- the sandboxes' network, as the agent makes it ---------------------------------
            path_a = in_provider(prov, "setup", ref_a, f"{box_a}/32", f"{buyer_a_ip}/32", "1")
            assert path_a == f"/var/run/netns/{netns_name(ref_a)}"
            # Idempotent: a second setup finds it as it is.
            assert in_provider(prov, "setup", ref_a, f"{box_a}/32", f"{buyer_a_ip}/32", "1") == (
                path_a
            )
            in_provider(prov, "setup", ref_b, f"{box_b}/32", f"{buyer_b_ip}/32", "0")
            assert set(in_provider(prov, "present").split()) >= {ref_a, ref_b}
            sbx_a, sbx_b = netns_name(ref_a), netns_name(ref_b)
            listen(bed, sbx_a, box_a)
            listen(bed, sbx_b, box_b)

            # -- the firewall, from the desired state's sandboxes ------------------------------
            def spec(ref, address, peer, egress):
                return wire.SandboxSpec(
                    ref=ref, image="molt/test:1", address=f"{address}/32",
                    peer_address=f"{peer}/32", gpus=(), cpus=1000, memory_mb=256, disk_gb=1,
                    pids_limit=64, egress=egress, ssh_keys=(),
                )  # fmt: skip

            desired = wire.DesiredState(
                node_id=node.node_id,
                revision=1,
                peers=(
                    wire.PeerSpec(a_key[1], (f"{buyer_a_ip}/32",), "job", ref_a),
                    wire.PeerSpec(b_key[1], (f"{buyer_b_ip}/32",), "job", ref_b),
                ),
                issued_at=int(time.time()),
                sandboxes=(
                    spec(ref_a, box_a, buyer_a_ip, True),
                    spec(ref_b, box_b, buyer_b_ip, False),
                ),
            )
            rules = sandbox_rules(desired)
            assert {rule.veth for rule in rules} == {host_veth(ref_a), host_veth(ref_b)}
            script = tmp_path / "table.nft"
            script.write_text(render_ruleset(prov_if, MESH_IP, rules))
            bed.exec(prov, "nft", "-f", str(script))

            # -- the host's readiness probe reaches each sandbox -------------------------------
            wait_listening(bed, prov, box_a)
            wait_listening(bed, prov, box_b)

            # -- buyers: their own sandbox, nothing else ---------------------------------------
            assert connects(bed, buy_a, box_a), "buyer A must reach its sandbox over the tunnel"
            assert connects(bed, buy_b, box_b), "buyer B must reach its sandbox over the tunnel"
            assert not connects(bed, buy_a, box_b), "buyer A reached B's sandbox"
            assert not connects(bed, buy_b, box_a), "buyer B reached A's sandbox"
            assert not connects(bed, buy_a, MESH_IP), "a sandboxed buyer reached the host"
            assert not connects(bed, buy_a, "192.168.77.1"), "a buyer reached the host's LAN side"
            assert not connects(bed, buy_a, "192.168.77.2"), "a buyer reached a LAN host"
            # The job block's route is what carries a sandbox's replies into the tunnel.
            bed.exec(prov, "ip", "route", "del", JOB_NETWORK, "dev", prov_if)
            assert not connects(bed, buy_a, box_a), "replies found the buyer without the route"
            bed.exec(prov, *configure)
            assert connects(bed, buy_a, box_a), "the agent's link set-up restores the route"

            # -- sandboxes: neither the host, nor the LAN, nor each other ----------------------
            for ns, other in ((sbx_a, box_b), (sbx_b, box_a)):
                assert not connects(bed, ns, other), f"{ns} reached the other sandbox"
                assert not connects(bed, ns, MESH_IP), f"{ns} reached the host's mesh address"
                assert not connects(bed, ns, prov_ip), f"{ns} reached the host's uplink address"
                assert not connects(bed, ns, "169.254.0.1"), f"{ns} reached its gateway"
                assert not connects(bed, ns, "192.168.77.2"), f"{ns} reached a LAN host"
                assert not connects(bed, ns, buyer_a_ip), f"{ns} opened a connection to a buyer"

            # -- egress: through NAT when allowed, not at all when forbidden -------------------
            assert connects(bed, sbx_a, inet_ip), "a sandbox with egress must reach the internet"
            before = drop_counts(bed, prov)
            assert not connects(bed, sbx_b, inet_ip), "a sandbox without egress reached out"
            after = drop_counts(bed, prov)
            no_egress = 'iifname "msbx*" ip saddr != @egress'
            assert after[no_egress] > before[no_egress]

            # -- without the table the same probes get through: the rules are what stop them --
            bed.exec(prov, "nft", "delete", "table", "inet", "clawnode")
            assert connects(bed, buy_a, box_b)
            assert connects(bed, buy_a, MESH_IP)
            assert connects(bed, buy_a, "192.168.77.2")
            assert connects(bed, buy_a, "192.168.77.1")
            assert connects(bed, sbx_a, prov_ip)
            assert connects(bed, sbx_a, "169.254.0.1")
            assert connects(bed, sbx_a, "192.168.77.2")
            assert connects(bed, sbx_a, MESH_IP)
            assert connects(bed, sbx_a, box_b)
            assert connects(bed, sbx_a, buyer_a_ip)

            # -- teardown: the veth (and its route) and the namespace go ----------------------
            in_provider(prov, "teardown", ref_a)
            in_provider(prov, "teardown", ref_a)  # one already gone is fine
            assert ref_a not in in_provider(prov, "present").split()
            assert host_veth(ref_a) not in bed.exec(prov, "ip", "link").stdout
            assert box_a not in bed.exec(prov, "ip", "route").stdout
        finally:
            for ref in (ref_a, ref_b):
                subprocess.run(
                    ["nsenter", f"--net=/var/run/netns/{prov}", "ip", "link", "del",
                     host_veth(ref)], capture_output=True, timeout=30,
                )  # fmt: skip
                subprocess.run(["ip", "netns", "del", netns_name(ref)], capture_output=True)
