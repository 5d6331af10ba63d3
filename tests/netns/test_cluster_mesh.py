"""The job's private network with real packets: two provider nodes, each with a sandbox of two
multi-node orders (X and Y), joined by one node-to-node WireGuard peer (real wireguard-go)
routing both orders' sandboxes, as meshnet.mesh gives it. Each node's desired state is checked
as the agent checks it (clawnode.job_peers.check_mesh_peers), its table rendered by the agent's
own translation (firewall.sandbox_rules, render_ruleset), its routes set by the agent's link
helper (Enrollment.routes: the job block and the sandbox blocks onto the interface), its
sandbox namespaces made by clawnode.sandbox.network. A TCP listener stands in for each
sandbox's services.

X's sandboxes reach each other across the nodes both ways, and so do Y's; X's reaches neither
Y's on the other node, nor the other node's own address, nor its LAN, nor is it reached from the
other node itself. Then node 2 turns hostile (no table, its peer widened to node 1's own
address): node 1's rules alone still keep the orders apart and its host out of reach. At the
end the tables are deleted and the same probes get through, so the rules, not the topology,
stopped them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from clawnode import wire
from clawnode.firewall import render_ruleset, sandbox_rules
from clawnode.job_peers import check_mesh_peers
from clawnode.keys import Identity
from clawnode.sandbox.network import host_veth, netns_name
from clawnode.state import DEFAULT_JOB_NETWORK, SANDBOX_NETWORK

from tests.netns.test_sandbox_isolation import (
    ANY,
    connects,
    drop_counts,
    in_provider,
    keypair,
    listen,
    wait_listening,
    wireguard,
)
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns]

MESH = {1: "10.100.128.1", 2: "10.100.128.2"}  # the nodes' mesh addresses
# Each node's sandbox /27 of the plan's sandboxes block; X and Y one sandbox on each node
BOX = {("x", 1): "10.128.0.33", ("y", 1): "10.128.0.34", ("x", 2): "10.128.0.65",
       ("y", 2): "10.128.0.66"}  # fmt: skip
LAN_HOST = "192.168.78.2"  # on node 2's LAN


def spec(ref: str, address: str, *mesh: str) -> wire.SandboxSpec:
    return wire.SandboxSpec(
        ref=ref, image="molt/test:1", address=f"{address}/32", peer_address="10.64.0.9/32",
        gpus=(), cpus=1000, memory_mb=256, disk_gb=1, pids_limit=64, egress=False, ssh_keys=(),
        mesh=tuple(f"{m}/32" for m in mesh),
    )  # fmt: skip


def test_an_orders_sandboxes_reach_each_other_across_nodes_and_nothing_else(tmp_path):
    suffix = f"{os.getpid() % 100000}"
    refs = {(job, n): f"order:{suffix}{job}{n}" for job, n in BOX}
    with network_testbed() as bed:
        prov = {1: bed.namespace("p1"), 2: bed.namespace("p2")}
        uplink = {n: bed.attach(prov[n]) for n in prov}
        lan = bed.namespace("lan")
        bed.link(prov[2], "192.168.78.1/24", lan, f"{LAN_HOST}/24", "lan")
        bed.exec(lan, "ip", "route", "add", "10.0.0.0/8", "via", "192.168.78.1")
        try:
            keys = {n: keypair() for n in prov}
            wg = {n: bed.wireguard_name(f"w{n}") for n in prov}
            # -- each node's desired state, as the gateway derives it --------------------------
            states = {}
            for n, other in ((1, 2), (2, 1)):
                states[n] = wire.DesiredState(
                    node_id=Identity.from_seed(bytes([n]) * 32).node_id,
                    revision=1,
                    peers=(
                        # One peer to the other node routing both orders' sandboxes there
                        wire.PeerSpec(
                            keys[other][1],
                            (f"{BOX['x', other]}/32", f"{BOX['y', other]}/32"),
                            "mesh",
                            f"node:{other}",
                            f"{uplink[other]}:51820",
                            25,
                        ),
                    ),
                    issued_at=int(time.time()),
                    sandboxes=(
                        spec(refs["x", n], BOX["x", n], BOX["x", other]),
                        spec(refs["y", n], BOX["y", n], BOX["y", other]),
                    ),
                )
                check_mesh_peers(states[n])  # what the agent would refuse is not applied
            # -- each node: its interface and routes, its sandboxes, its table -----------------
            for n in prov:
                (peer,) = states[n].peers
                wireguard(bed, prov[n], wg[n], keys[n][0], f"{MESH[n]}/17", tmp_path,
                          [(peer.public_key, ",".join(peer.allowed_ips), peer.endpoint)],
                          port=51820)  # fmt: skip
                bed.exec(prov[n], sys.executable, "-m",
                         "clawnode.backends.links", "configure", wg[n], f"{MESH[n]}/17",
                         DEFAULT_JOB_NETWORK, SANDBOX_NETWORK)  # fmt: skip
                for box in states[n].sandboxes:
                    in_provider(prov[n], "setup", box.ref, box.address, box.peer_address, "0")
                    listen(bed, netns_name(box.ref), box.address.split("/")[0])
                script = tmp_path / f"table{n}.nft"
                script.write_text(render_ruleset(wg[n], MESH[n], sandbox_rules(states[n])))
                bed.exec(prov[n], "nft", "-f", str(script))
                listen(bed, prov[n], ANY)  # the node's own services, on every address
            listen(bed, lan, ANY)
            for job, n in BOX:
                wait_listening(bed, prov[n], BOX[job, n])  # the host's readiness probe

            def sandbox(job: str, n: int) -> str:
                return netns_name(refs[job, n])

            # -- the same order across the nodes: both ways, for both orders -------------------
            for job in ("x", "y"):
                assert connects(bed, sandbox(job, 1), BOX[job, 2]), f"{job} 1 -> 2 failed"
                assert connects(bed, sandbox(job, 2), BOX[job, 1]), f"{job} 2 -> 1 failed"
            # -- nothing else ------------------------------------------------------------------
            before = drop_counts(bed, prov[1])
            assert not connects(bed, sandbox("x", 1), BOX["y", 2]), "X reached Y's sandbox"
            assert not connects(bed, sandbox("y", 2), BOX["x", 1]), "Y reached X's sandbox"
            assert not connects(bed, sandbox("x", 1), BOX["y", 1]), "X reached Y on its node"
            # Stopped by node 1's rules on the way out, before the tunnel
            onto_tunnel = f'oifname "{wg[1]}"'
            assert drop_counts(bed, prov[1])[onto_tunnel] > before[onto_tunnel]
            for target in (MESH[2], uplink[2], LAN_HOST, MESH[1], uplink[1]):
                assert not connects(bed, sandbox("x", 1), target), f"X reached {target}"
            # The other node itself reaches no sandbox over the peer
            assert not connects(bed, prov[2], BOX["x", 1]), "node 2 reached X's sandbox on 1"
            # -- node 2 turned hostile: no table, its peer to node 1 widened to node 1 itself --
            bed.exec(prov[2], "nft", "delete", "table", "inet", "clawnode")
            widened = ",".join([f"{BOX['x', 1]}/32", f"{BOX['y', 1]}/32", f"{MESH[1]}/32"])
            bed.exec(prov[2], "wg", "set", wg[2], "peer", keys[1][1], "allowed-ips", widened)
            assert not connects(bed, sandbox("x", 2), MESH[1]), "a member reached node 1's host"
            assert not connects(bed, sandbox("x", 2), BOX["y", 1]), "node 1 let X reach Y"
            assert connects(bed, sandbox("x", 2), BOX["x", 1])
            # -- without the tables the same probes get through: the rules are what stop them --
            bed.exec(prov[1], "nft", "delete", "table", "inet", "clawnode")
            assert connects(bed, sandbox("x", 2), BOX["y", 1])
            assert connects(bed, sandbox("x", 2), MESH[1])
            assert connects(bed, sandbox("x", 1), BOX["y", 2])
        finally:
            for (_, n), ref in refs.items():
                subprocess.run(
                    ["nsenter", f"--net=/var/run/netns/{prov[n]}", "ip", "link", "del",
                     host_veth(ref)], capture_output=True, timeout=30,
                )  # fmt: skip
                subprocess.run(["ip", "netns", "del", netns_name(ref)], capture_output=True)
