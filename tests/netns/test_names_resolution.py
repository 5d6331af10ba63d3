"""Sandbox names with real packets (clawnode.names, docs/names.md): the agent's responder runs in
the provider's namespace, started before any sandbox exists (it binds the sandboxes' gateway
address with IP_FREEBIND) and fed a names table signed by a gateway key, checked by the same
code the daemon uses. Two orders, each with a sandbox made by clawnode.sandbox.network and a
buyer behind real wireguard-go; the provider's table is clawnode.firewall's with ``names``.

Lookups go through glibc (``getent hosts``) with the resolv.conf the sandbox (podman --dns,
--dns-search) and the buyer (wg-quick's ``DNS =`` line) would get, set per namespace through
``ip netns exec``'s /etc/netns/NAME/ bind mounts, and through dnspython for the exact rcodes.
Without the table's port-53 exception the same lookups time out: the rule is what lets them in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clawnode import wire
from clawnode.daemon import sandbox_rules
from clawnode.firewall import render_ruleset
from clawnode.keys import Identity
from clawnode.sandbox.network import GATEWAY, host_veth, netns_name

from tests.netns.test_sandbox_isolation import JOB_NETWORK, MESH_IP, in_provider, keypair, wireguard
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns]

RESPONDER = """
import asyncio, base64, json, sys
from clawnode import names
from clawnode.sandbox.network import GATEWAY
envelope = json.load(open(sys.argv[1]))
key, node_id, mesh = base64.b64decode(sys.argv[2]), sys.argv[3], sys.argv[4]

async def main():
    responder = names.NamesResponder([mesh, GATEWAY], upstreams=())
    await responder.start()
    refused = names.apply_envelope(responder, envelope, gateway_key=key, node_id=node_id,
                                   desired=None)
    print(refused or "ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

QUERY = """
import sys, dns.message, dns.query, dns.rcode, dns.exception
server, name, proto = sys.argv[1], sys.argv[2], sys.argv[3]
query = dns.message.make_query(name, "A")
try:
    reply = (dns.query.tcp if proto == "tcp" else dns.query.udp)(query, server, timeout=2)
except (OSError, dns.exception.Timeout):
    print("timeout")
else:
    print(dns.rcode.to_text(reply.rcode()), *[i.address for rr in reply.answer for i in rr])
"""


def ask(bed, ns: str, server: str, name: str, proto: str = "udp") -> str:
    return bed.exec(ns, sys.executable, "-c", QUERY, server, name, proto).stdout.strip()


def getent(bed, ns: str, name: str) -> str:
    """glibc's answer for `name` in `ns` ("" when it does not resolve)."""
    done = bed.exec(ns, "getent", "ahostsv4", name, check=False, timeout=30)
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout else ""


def resolv_conf(ns: str, server: str, made: list[Path]) -> None:
    """What `ip netns exec ns` shows as /etc/resolv.conf (iproute2 bind-mounts
    /etc/netns/NS/resolv.conf): the sandbox's, or the buyer's tunnel's, resolver."""
    folder = Path("/etc/netns") / ns
    folder.mkdir(parents=True, exist_ok=True)
    made.append(folder)
    (folder / "resolv.conf").write_text(
        f"nameserver {server}\nsearch molt\noptions timeout:1 attempts:1\n"
    )


def test_each_order_resolves_its_own_names_and_nothing_of_another_order(tmp_path):
    gateway, node = Identity.generate(), Identity.from_seed(bytes(range(32)))
    suffix = f"{os.getpid() % 100000}"
    ref_a, ref_b = f"order:{suffix}1", f"order:{suffix}2"
    name_a, name_b = f"order-{suffix}1-0", f"order-{suffix}2-0"
    box_a, box_b = "10.128.0.33", "10.128.0.34"
    buyer_a_ip, buyer_b_ip = "10.64.0.7", "10.64.0.8"
    made: list[Path] = []
    with network_testbed() as bed:
        prov, buy_a, buy_b = (bed.namespace(r) for r in ("prov", "bya", "byb"))
        prov_ip = bed.attach(prov)
        bed.attach(buy_a)
        bed.attach(buy_b)
        try:
            # -- the provider's tunnel and two buyers, as in the isolation test ---------------
            prov_if, a_if, b_if = (bed.wireguard_name(r) for r in ("p", "a", "b"))
            prov_key, a_key, b_key = keypair(), keypair(), keypair()
            wireguard(bed, prov, prov_if, prov_key[0], f"{MESH_IP}/17", tmp_path,
                      [(a_key[1], f"{buyer_a_ip}/32", ""), (b_key[1], f"{buyer_b_ip}/32", "")],
                      port=51820)  # fmt: skip
            bed.exec(prov, sys.executable, "-m", "clawnode.backends.links", "configure",
                     prov_if, f"{MESH_IP}/17", JOB_NETWORK)  # fmt: skip
            for ns, name, key, ip in ((buy_a, a_if, a_key, buyer_a_ip),
                                      (buy_b, b_if, b_key, buyer_b_ip)):  # fmt: skip
                # What the buyer's wg-quick file routes: its sandbox and the node's responder
                tunnel = (prov_key[1], "10.0.0.0/8", f"{prov_ip}:51820")
                wireguard(bed, ns, name, key[0], f"{ip}/32", tmp_path, [tunnel])
                bed.exec(ns, "ip", "route", "add", "10.0.0.0/8", "dev", name)
                resolv_conf(ns, MESH_IP, made)

            # -- the names table, signed by the gateway; the responder before any sandbox ------
            groups = [
                wire.NameGroup(ref=ref, clients=(box, buyer),
                               records=(wire.NameRecord(name=f"{label}.molt", address=box),))
                for ref, box, buyer, label in ((ref_a, box_a, buyer_a_ip, name_a),
                                               (ref_b, box_b, buyer_b_ip, name_b))
            ]  # fmt: skip
            table = wire.NameTable(node_id=node.node_id, revision=1, groups=tuple(groups),
                                   issued_at=int(time.time()))  # fmt: skip
            envelope = tmp_path / "names.json"
            envelope.write_text(
                json.dumps(wire.signed_envelope(wire.NAMES, table.to_dict(), gateway))
            )
            responder = bed.popen(
                prov, [sys.executable, "-c", RESPONDER, str(envelope), gateway.public_key_b64,
                       node.node_id, MESH_IP],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert responder.stdout is not None
            assert responder.stdout.readline().strip() == "ready"

            # -- the sandboxes, their resolv.conf as podman --dns/--dns-search writes it -------
            in_provider(prov, "setup", ref_a, f"{box_a}/32", f"{buyer_a_ip}/32", "0")
            in_provider(prov, "setup", ref_b, f"{box_b}/32", f"{buyer_b_ip}/32", "0")
            sbx_a, sbx_b = netns_name(ref_a), netns_name(ref_b)
            resolv_conf(sbx_a, GATEWAY, made)
            resolv_conf(sbx_b, GATEWAY, made)

            def spec(ref, address, peer):
                return wire.SandboxSpec(
                    ref=ref, image="molt/test:1", address=f"{address}/32",
                    peer_address=f"{peer}/32", gpus=(), cpus=1000, memory_mb=256, disk_gb=1,
                    pids_limit=64, egress=False, ssh_keys=(),
                )  # fmt: skip

            desired = wire.DesiredState(
                node_id=node.node_id, revision=1,
                peers=(wire.PeerSpec(a_key[1], (f"{buyer_a_ip}/32",), "job", ref_a),
                       wire.PeerSpec(b_key[1], (f"{buyer_b_ip}/32",), "job", ref_b)),
                issued_at=int(time.time()),
                sandboxes=(spec(ref_a, box_a, buyer_a_ip), spec(ref_b, box_b, buyer_b_ip)),
            )  # fmt: skip
            rules = sandbox_rules(desired)
            script = tmp_path / "table.nft"

            # -- without the names exception, no lookup gets through ---------------------------
            script.write_text(render_ruleset(prov_if, MESH_IP, rules))
            bed.exec(prov, "nft", "-f", str(script))
            assert ask(bed, sbx_a, GATEWAY, f"{name_a}.molt") == "timeout"
            assert ask(bed, buy_a, MESH_IP, f"{name_a}.molt") == "timeout"

            # -- with it -----------------------------------------------------------------------
            script.write_text(render_ruleset(prov_if, MESH_IP, rules, names=True))
            bed.exec(prov, "nft", "-f", str(script))

            # Members resolve their order's name, by glibc with the search domain, UDP and TCP
            assert getent(bed, sbx_a, name_a) == box_a, "a sandbox must resolve its own name"
            assert getent(bed, buy_a, name_a) == box_a, "the buyer must resolve it (tunnel)"
            assert getent(bed, sbx_b, name_b) == box_b
            assert getent(bed, buy_b, name_b) == box_b
            assert ask(bed, buy_a, MESH_IP, f"{name_a}.molt", "tcp") == f"NOERROR {box_a}"
            assert ask(bed, sbx_a, GATEWAY, f"{name_a}.molt", "tcp") == f"NOERROR {box_a}"

            # Non-members: the other order's name is exactly a name nobody has
            assert getent(bed, sbx_a, name_b) == ""
            assert getent(bed, buy_a, name_b) == ""
            assert getent(bed, buy_b, name_a) == ""
            for ns, server in ((sbx_a, GATEWAY), (buy_a, MESH_IP)):
                assert ask(bed, ns, server, f"{name_b}.molt") == "NXDOMAIN"
                assert ask(bed, ns, server, "order-0-0.molt") == "NXDOMAIN"
            # A sandbox without egress gets no answer for the outside world through DNS
            assert ask(bed, sbx_b, GATEWAY, "example.com") == "REFUSED"
            # The responder is not reachable from the underlay (it binds the mesh and gateway
            # addresses only), nor is anything else of the host from a sandboxed buyer
            assert ask(bed, buy_a, prov_ip, f"{name_a}.molt") == "timeout"
            assert responder.poll() is None, "the responder must still be running"
        finally:
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
            for ref in (ref_a, ref_b):
                subprocess.run(
                    ["nsenter", f"--net=/var/run/netns/{prov}", "ip", "link", "del",
                     host_veth(ref)], capture_output=True, timeout=30,
                )  # fmt: skip
                subprocess.run(["ip", "netns", "del", netns_name(ref)], capture_output=True)
