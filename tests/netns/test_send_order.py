"""The order of the sends between two nodes on real wireguard-go (clawnode.send_order,
docs/nat.md): two namespaces, each a node running the agent's userspace backend through
backend_driver, get their node-to-node peers (as meshnet.mesh gives them: endpoint, keepalive
25) in the same instant. Every handshake initiation on the wire between them is captured.

The node whose id sorts first starts at once; the second adds the peer silent, so the first
side's initiation is answered (retried by wireguard-go after 5 s if it arrived before the second
had the peer) and the second has a handshake before it has sent anything of its own. Released
after the stagger, it then turns only its keepalive on, over that session: the second side
sends no initiation at all, and the tunnel carries pings both ways. Without the order both sides
initiate at once (the crossing that can leave wireguard-go without a working session).
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
from pathlib import Path

import pytest
from clawnode import wire
from clawnode.keys import Identity
from clawnode.send_order import STAGGER_SECONDS

from tests.netns.backend_driver import Driver
from tests.netns.test_userspace_backend import wait_for
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns]

IDS = {n: Identity.from_seed(bytes([n + 40]) * 32) for n in (1, 2)}
FIRST, SECOND = sorted(IDS, key=lambda n: IDS[n].node_id)
ADDRESS = {n: f"203.0.113.{n}" for n in IDS}  # each node's address on the link between them
MESH = {n: f"10.100.128.{n}" for n in IDS}
PORT = 51820


def state_of(n: int) -> wire.DesiredState:
    other = 3 - n
    peer = wire.PeerSpec(
        IDS[other].wireguard_public_key_b64, (f"{MESH[other]}/32",), "mesh",
        f"node:{IDS[other].node_id}", f"{ADDRESS[other]}:{PORT}", 25,
    )  # fmt: skip
    return wire.DesiredState(
        node_id=IDS[n].node_id, revision=1, peers=(peer,), issued_at=int(time.time())
    )


def initiations(pcap: Path) -> list[str]:
    """The source address of each WireGuard handshake initiation (message type 1) captured."""
    shown = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-n", "udp[8] = 1"], capture_output=True, text=True
    ).stdout
    return re.findall(rf"IP (\d+\.\d+\.\d+\.\d+)\.{PORT} > ", shown)


def test_the_second_node_answers_the_first_and_never_initiates(tmp_path):
    with network_testbed() as bed:
        ns = {n: bed.namespace(f"so{n}") for n in IDS}
        bed.link(ns[1], f"{ADDRESS[1]}/24", ns[2], f"{ADDRESS[2]}/24", tag="so")
        pcap = tmp_path / "wire.pcap"
        tcpdump = bed.popen(
            ns[1],
            ["tcpdump", "-i", "any", "-n", "-U", "-Z", "root", "-w", str(pcap), f"udp port {PORT}"],
            stderr=subprocess.PIPE,
        )
        assert tcpdump.stderr is not None
        for _ in range(5):  # a line or two about the link type, then it listens
            if b"listening on" in tcpdump.stderr.readline():
                break
        else:
            pytest.fail("tcpdump did not start listening")
        drivers = {n: Driver(bed, ns[n], "userspace") for n in IDS}
        try:
            for n, driver in drivers.items():
                driver.call(
                    "ensure_interface",
                    name=bed.wireguard_name(f"sw{n}"),
                    private_key=base64.b64encode(IDS[n].wireguard_private_key).decode(),
                    listen_port=PORT,
                    address=f"{MESH[n]}/17",
                )
            states = {n: state_of(n).to_dict() for n in IDS}
            # -- the same push, applied by both nodes in the same instant -----------------------
            for n, driver in drivers.items():
                driver.send("order", desired=states[n], stagger=STAGGER_SECONDS)
            applied = {n: driver.reply() for n, driver in drivers.items()}
            first_key = IDS[FIRST].wireguard_public_key_b64
            assert [(a["action"], a["endpoint"], a["keepalive"]) for a in applied[FIRST]] == [
                ("Add", f"{ADDRESS[SECOND]}:{PORT}", 25)
            ]
            assert applied[SECOND] == [
                {"action": "Add", "public_key": first_key, "allowed_ips": [f"{MESH[FIRST]}/32"],
                 "endpoint": "", "keepalive": 0}
            ]  # fmt: skip
            # -- the first side's initiation is answered: a handshake on the second side --------
            second_peer = lambda: drivers[SECOND].call("list_peers")[first_key]  # noqa: E731
            wait_for(lambda: second_peer()["last_handshake"], 15, "the second side's handshake")
            assert second_peer()["endpoint"] == f"{ADDRESS[FIRST]}:{PORT}"  # learned from it
            # -- released: the keepalive over that session, the endpoint it learned kept (here
            # the one the gateway named: no NAT between them, so nothing to move) --------------
            released = drivers[SECOND].call(
                "release", desired=states[SECOND], stagger=STAGGER_SECONDS
            )
            assert [(a["action"], a["endpoint"], a["changed"]) for a in released] == [
                ("Update", f"{ADDRESS[FIRST]}:{PORT}", ["keepalive"])
            ]
            for n in IDS:
                bed.exec(ns[n], "ping", "-c", "3", "-W", "1", MESH[3 - n])
            # -- on the wire: initiations from the first node only ------------------------------
            wait_for(lambda: initiations(pcap), 5, "the capture")
            assert set(initiations(pcap)) == {ADDRESS[FIRST]}
        finally:
            for driver in drivers.values():
                driver.close()
