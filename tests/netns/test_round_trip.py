"""The agent's round trips to its job peers (clawnode.rtt) across real wireguard-go tunnels, under
the firewall the agent renders (clawnode.firewall), both buyers sandboxed job peers.

Topology (testbed.py): a provider and two buyers on the bridge. In the provider's namespace the
agent's own code runs as a round would: the job peers with a live session read from the device
(the agent's userspace backend over wireguard-go's UAPI), pinged from the mesh address by
IcmpPinger, the results as the signed frame's RoundTrips. Buyer A answers ICMP; buyer B's host
drops echo requests (Windows' default) and reads "no answer".

The firewall: the one exception (an echo reply conntrack ties to the host's own request) is
what lets A's answer in (without that rule A reads "no answer" too), and a sandboxed buyer
still reaches nothing of the host: its own ping and TCP to the mesh address, and a forged
echo reply, are dropped; with the table deleted the same ping gets through.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clawnode import wire
from clawnode.firewall import SandboxRule, render_ruleset
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns]

MESH_IP = "10.100.128.1"
JOB_NETWORK = "10.64.0.0/11"
BUYER_A, BUYER_B = "10.64.0.7", "10.64.0.8"
EXCEPTION = re.compile(r"^.*icmp type echo-reply.* accept\n", re.M)

# One round of the agent's, in the provider's namespace: argv = desired state (JSON), interface,
# mesh address. Prints the RoundTrips body the frame would carry.
ROUND = """
import json, sys, time
from clawnode import rtt, wire
from clawnode.backends.userspace import UserspaceBackend
from clawnode.keys import Identity
desired = wire.DesiredState.from_dict(json.loads(sys.argv[1]))
found = rtt.targets(desired, UserspaceBackend(sys.argv[2]).list_peers(), time.time())
results = rtt.measure(rtt.IcmpPinger(), sys.argv[3], found)
identity = Identity.from_seed(bytes(range(32)))
frame = rtt.frame(identity, results)
body = wire.open_envelope(frame["envelope"], identity.public_key, wire.ROUND_TRIPS)
print(json.dumps(body))
"""

# A buyer sends the host an echo reply nobody asked for (what a peer could try to slip in).
FORGED_REPLY = """
import socket, sys
from clawnode.rtt import _checksum
import struct
header = struct.pack("!BBHHH", 0, 0, 0, 4242, 1) + b"x" * 16
packet = header[:2] + struct.pack("!H", _checksum(header)) + header[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for _ in range(3):
    s.sendto(packet, (sys.argv[1], 0))
"""


def keypair() -> tuple[str, str]:
    private, public = generate_wireguard_keypair()
    return encode_key(private), encode_key(public)


def wireguard(bed, ns, name, private, address, tmp: Path, peers, port=None) -> None:
    """wireguard-go interface `name` in `ns` with `address` and `peers`: [(key, allowed,
    endpoint)] (an endpoint with keepalive 1 s: the buyer keeps its session live)."""
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
            command += ["endpoint", endpoint, "persistent-keepalive", "1"]
    bed.exec(ns, *command)
    bed.exec(ns, "ip", "addr", "add", address, "dev", name)
    bed.exec(ns, "ip", "link", "set", name, "up")


def one_round(bed, prov, desired: wire.DesiredState, interface: str) -> dict[str, dict]:
    out = bed.exec(
        prov, sys.executable, "-c", ROUND, json.dumps(desired.to_dict()), interface, MESH_IP
    ).stdout
    body = wire.RoundTrips.from_dict(json.loads(out))
    return {peer.ref: peer.to_dict() for peer in body.peers}


def pings(bed, ns: str, address: str) -> bool:
    return bed.exec(ns, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def connects(bed, ns: str, address: str, port: int = 2222) -> bool:
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(('{address}', {port}), timeout=2); sys.exit(0)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return bed.exec(ns, sys.executable, "-c", probe, check=False).returncode == 0


def sandboxed_drops(bed, prov: str, interface: str) -> int:
    listing = bed.exec(prov, "nft", "list", "table", "inet", "clawnode").stdout
    rule = re.search(rf'iifname "{interface}" ip saddr @sandboxed counter packets (\d+)', listing)
    assert rule, listing
    return int(rule.group(1))


def test_the_agent_measures_a_real_round_trip_and_a_silent_buyer_reads_no_answer(tmp_path):
    node = Identity.from_seed(bytes(range(32)))
    suffix = f"{os.getpid() % 100000}"
    ref_a, ref_b = f"order:{suffix}1", f"order:{suffix}2"
    with network_testbed() as bed:
        prov, buy_a, buy_b = (bed.namespace(r) for r in ("rprov", "rbya", "rbyb"))
        prov_ip = bed.attach(prov)
        bed.attach(buy_a)
        bed.attach(buy_b)
        prov_if, a_if, b_if = (bed.wireguard_name(r) for r in ("rp", "ra", "rb"))
        prov_key, a_key, b_key = keypair(), keypair(), keypair()
        wireguard(bed, prov, prov_if, prov_key[0], f"{MESH_IP}/17", tmp_path,
                  [(a_key[1], f"{BUYER_A}/32", ""), (b_key[1], f"{BUYER_B}/32", "")],
                  port=51820)  # fmt: skip
        bed.exec(prov, sys.executable, "-m", "clawnode.backends.links", "configure", prov_if,
                 f"{MESH_IP}/17", JOB_NETWORK)  # fmt: skip
        for ns, name, key, ip in ((buy_a, a_if, a_key, BUYER_A), (buy_b, b_if, b_key, BUYER_B)):
            tunnel = (prov_key[1], "10.0.0.0/8", f"{prov_ip}:51820")
            wireguard(bed, ns, name, key[0], f"{ip}/32", tmp_path, [tunnel])
            bed.exec(ns, "ip", "route", "add", "10.0.0.0/8", "dev", name)
            bed.popen(ns, [sys.executable, "-m", "http.server", "2222", "--bind", ip],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        bed.popen(prov, [sys.executable, "-m", "http.server", "2222"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        # Buyer B's host answers no ping (as Windows does by default).
        bed.exec(buy_b, "nft", "add table inet silent; add chain inet silent input "
                 "{ type filter hook input priority 0; icmp type echo-request drop; }")  # fmt: skip

        desired = wire.DesiredState(
            node_id=node.node_id,
            revision=1,
            peers=(
                wire.PeerSpec(a_key[1], (f"{BUYER_A}/32",), "job", ref_a),
                wire.PeerSpec(b_key[1], (f"{BUYER_B}/32",), "job", ref_b),
            ),
            issued_at=int(time.time()),
        )
        # Both buyers own a sandbox (its veth need not exist): they are @sandboxed.
        rules = [
            SandboxRule("msbx0000000000a", "10.128.0.33/32", f"{BUYER_A}/32", False),
            SandboxRule("msbx0000000000b", "10.128.0.34/32", f"{BUYER_B}/32", False),
        ]
        table = render_ruleset(prov_if, MESH_IP, rules)
        assert EXCEPTION.search(table)
        script = tmp_path / "table.nft"
        script.write_text(table)
        bed.exec(prov, "nft", "-f", str(script))

        # Both buyers' keepalives give each a live session on the provider's device.
        deadline = time.monotonic() + 20
        while True:
            shakes = bed.exec(prov, "wg", "show", prov_if, "latest-handshakes").stdout.split()
            if len(shakes) == 4 and all(int(t) > 0 for t in shakes[1::2]):
                break
            assert time.monotonic() < deadline, f"no handshakes: {shakes}"
            time.sleep(0.2)

        # -- a round: A answers with its real round trip, B reads no answer ----------------
        found = one_round(bed, prov, desired, prov_if)
        assert set(found) == {ref_a, ref_b}
        assert found[ref_a]["answered"] is True and found[ref_a]["rtt_us"] > 0
        assert found[ref_a]["public_key"] == a_key[1]
        assert (found[ref_b]["answered"], found[ref_b]["rtt_us"]) == (False, 0)
        print(f"\nround trip to buyer A across wireguard-go: {found[ref_a]['rtt_us']} us")

        # -- a sandboxed buyer still reaches nothing of the host ---------------------------
        # Each is seen dropped by the sandboxed peers' drop, after the echo-reply exception.
        drops = sandboxed_drops(bed, prov, prov_if)
        assert not pings(bed, buy_a, MESH_IP), "a sandboxed buyer's ping reached the host"
        drops, before = sandboxed_drops(bed, prov, prov_if), drops
        assert drops >= before + 1
        assert not connects(bed, buy_a, MESH_IP), "a sandboxed buyer reached the host's TCP"
        drops, before = sandboxed_drops(bed, prov, prov_if), drops
        assert drops >= before + 1
        # An echo reply the host never asked for is not established: all three dropped.
        bed.exec(buy_a, sys.executable, "-c", FORGED_REPLY, MESH_IP)
        assert sandboxed_drops(bed, prov, prov_if) >= drops + 3

        # -- the exception is what lets A's answer in --------------------------------------
        script.write_text(EXCEPTION.sub("", table))
        bed.exec(prov, "nft", "-f", str(script))
        found = one_round(bed, prov, desired, prov_if)
        assert found[ref_a]["answered"] is False, "A's reply came in without the exception"

        # -- without the table the buyer's own ping gets through: the rules stopped it -----
        bed.exec(prov, "nft", "delete", "table", "inet", "clawnode")
        assert pings(bed, buy_a, MESH_IP)
        # ... and B stays silent without it: its own host is what drops the pings.
        found = one_round(bed, prov, desired, prov_if)
        assert found[ref_a]["answered"] is True and found[ref_b]["answered"] is False
