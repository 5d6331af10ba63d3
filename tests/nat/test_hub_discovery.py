"""Endpoint discovery through the gateway's hub, in MOLT code, across the NAT lab.

The hub is `manage.py run_hub` (meshnet.hub) on wireguard-go in the lab's services network
(192.0.2.10:51800), on the test's database (through PostgreSQL's Unix socket: the lab's
namespaces have no route to the machine's loopback, and a Unix socket crosses network
namespaces). A node enrolled through the signed enrolment path runs the agent's userspace
backend behind a NAT of the lab; its WireGuard key is its identity's X25519 conversion, and it
applies its signed desired state with the agent's own reconcile (tests/netns/backend_driver.py),
which brings it the hub as a peer with keepalive. The database must end up with the node's
public mapping as the NAT translated it: the NAT's public address (never the node's private
one) and the port the hub's `wg show endpoints` sees. Then the NAT "reboots" (its connection
tracking flushed): behind a symmetric NAT the node's next keepalive leaves from a new public
port, and the database must follow.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time

import pytest
from clawnode import connectivity as agent_check
from clawnode import wire
from django.utils import timezone

from marketplace.demo_data import enrol_node
from meshnet.connectivity import record_connectivity
from meshnet.desired_state import signed_desired_state
from meshnet.enrolment import create_enrollment_token
from meshnet.gateway_key import gateway_identity
from meshnet.models import Node
from tests.nat import lab as nat_lab
from tests.nat.services import BIN, DEADLINE_S, HUB_ENDPOINT, Hub, LabGateway
from tests.nat.services import wait_for as _wait_for
from tests.netns.backend_driver import Driver

pytestmark = [pytest.mark.nat, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _observed(node: Node) -> str:
    return Node.objects.values_list("observed_endpoint", flat=True).get(pk=node.pk)


def _flush_conntrack(ns: str, lab: nat_lab.Lab) -> None:
    """A router reboot as far as its mappings go: every connection-tracking entry gone."""
    lab.exec(ns, sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()")


def _transfer(lab: nat_lab.Lab, ns: str, interface: str, key: str) -> tuple[int, int]:
    for line in lab.exec(ns, "wg", "show", interface, "transfer").stdout.splitlines():
        peer, rx, tx = line.split("\t")
        if peer == key:
            return int(rx), int(tx)
    raise AssertionError(f"{interface} has no peer {key}")


def _the_hub_carries_no_traffic(
    lab: nat_lab.Lab, hub: Hub, node_ns: str, node_if: str, hub_key: str
) -> None:
    """The node routes pings to 10.100.0.1 into its tunnel to the hub; the hub decrypts them
    (its peer has no allowed IP) and drops them: not one reaches the hub's interface, where the
    gateway host's own stack would take them."""
    table = (
        "table inet hubcheck {\n chain pre {\n  type filter hook prerouting priority -300;\n"
        f'  iifname "{hub.interface}" counter\n }}\n}}\n'
    )
    nat_lab.run("ip", "netns", "exec", lab.services, "nft", "-f", "-", stdin=table)
    lab.exec(node_ns, "ip", "route", "add", "10.100.0.1/32", "dev", node_if)
    _, sent_before = _transfer(lab, node_ns, node_if, hub_key)
    lab.exec(node_ns, "ping", "-c", "5", "-i", "0.2", "-W", "1", "10.100.0.1", check=False)
    _, sent_after = _transfer(lab, node_ns, node_if, hub_key)
    # Five 84-byte echo requests went into the tunnel (more than a keepalive or two could add),
    assert sent_after - sent_before >= 5 * 84
    # and none came out of the hub's side.
    listing = lab.exec(lab.services, "nft", "list", "chain", "inet", "hubcheck", "pre").stdout
    packets = re.search(r"counter packets (\d+)", listing)
    assert packets and packets.group(1) == "0", listing
    lab.exec(lab.services, "nft", "delete", "table", "inet", "hubcheck")


def _lab_sites(lab: nat_lab.Lab, *sites) -> tuple[list, list[str]]:
    """The hosts of each (kind, network, names) site made in the lab, and the namespaces the
    sites added (what the test releases)."""
    before = set(lab.namespaces)
    hosts = [lab.site(kind, network, names) for kind, network, names in sites]
    return hosts, [ns for ns in lab.namespaces if ns not in before]


def _node_interface_up(lab: nat_lab.Lab, hub: Hub, agent: Driver, node: Node, identity) -> str:
    """Once the hub has the node as a peer (its reconcile, every 1 s here), the node's
    WireGuard interface under the agent's userspace backend; returns the interface's name."""
    known, _ = _wait_for(lambda: node.wireguard_public_key in hub.endpoints(), 20)
    assert known, f"the hub never added the node as a peer:\n{hub.log()}"
    node_if = lab.wireguard_name("p")
    agent.call(
        "ensure_interface",
        name=node_if,
        private_key=base64.b64encode(identity.wireguard_private_key).decode(),
        listen_port=51820,
        address=f"{node.mesh_address}/32",
    )
    return node_if


def _signed_state_body(node: Node) -> dict:
    """The node's signed desired state, checked against the gateway key the agent pinned."""
    return wire.open_envelope(
        signed_desired_state(node), gateway_identity().public_key, wire.DESIRED_STATE
    )


def _buyer_mapping_via_the_hub(lab: nat_lab.Lab, buyer, peer) -> str | None:
    """Give the buyer's client the hub peer exactly as the downloaded wg-quick file names it
    (meshnet.hub.buyer_hub_peer); the mapping the hub then stores on the job peer, or None if
    none within DEADLINE_S."""
    from meshnet.hub import buyer_hub_peer
    from meshnet.models import JobPeer

    spec = buyer_hub_peer()
    buyer.set_peer(
        lab,
        spec.public_key,
        "endpoint",
        spec.endpoint,
        "persistent-keepalive",
        str(spec.persistent_keepalive),
        "allowed-ips",
        ",".join(spec.allowed_ips),
    )
    stored, _ = _wait_for(
        lambda: JobPeer.objects.values_list("observed_endpoint", flat=True).get(pk=peer.pk)
    )
    return stored


@pytest.mark.parametrize("kind_name", ["port-restricted", "symmetric", "double"])
def test_the_hub_stores_the_nodes_public_mapping(lab, settings, provider, tmp_path, kind_name):
    settings.MOLT_HUB_ENDPOINT = HUB_ENDPOINT
    settings.MOLT_HUB_KEEPALIVE_SECONDS = 1  # the node's keepalive toward the hub
    kind = nat_lab.KINDS_BY_NAME[kind_name]
    node, identity = enrol_node(provider, hostname="home-rig", gpus=[], observed_ip=None)
    [(host,)], site_namespaces = _lab_sites(lab, (kind, nat_lab.PROVIDER_NET, ["p"]))
    hub = Hub(lab, settings, tmp_path)
    agent = Driver(lab, host.ns, "userspace")
    try:
        # The hub has the node as a peer before the node sends; then the agent's side: its
        # interface, then its signed desired state, applied with the agent's reconcile.
        hub_key = gateway_identity().wireguard_public_key_b64
        node_if = _node_interface_up(lab, hub, agent, node, identity)
        body = _signed_state_body(node)
        applied_at = time.monotonic()
        applied = agent.call("reconcile", desired=body)
        assert applied == {"actions": ["Add"], "results": {hub_key: "ok"}}

        endpoint, _ = _wait_for(lambda: _observed(node))
        took = time.monotonic() - applied_at
        assert endpoint, f"no mapping stored in {DEADLINE_S:g} s:\n{hub.log()}"
        host_part = endpoint.rpartition(":")[0]
        # The NAT's public address, as it translated the node's packets; never the LAN's.
        assert host_part == host.public_ip != host.address
        assert endpoint == hub.endpoints()[node.wireguard_public_key]
        node.refresh_from_db()
        assert node.endpoint == endpoint  # what the buyer's config names
        print(f"\n{kind_name}: node {host.address}:51820 observed as {endpoint} in {took:.2f} s")

        if kind_name == "port-restricted":
            _the_hub_carries_no_traffic(lab, hub, host.ns, node_if, hub_key)

        if kind.mapping is nat_lab.Mapping.ENDPOINT_DEPENDENT:
            # The router reboots: its mappings are gone, the next keepalive gets a new random
            # public port, the hub sees it, the database follows.
            flushed_at = time.monotonic()
            for ns in site_namespaces:
                _flush_conntrack(ns, lab)
            moved, _ = _wait_for(lambda: (_observed(node) != endpoint) and _observed(node))
            took = time.monotonic() - flushed_at
            assert moved, f"the mapping change was not stored in {DEADLINE_S:g} s:\n{hub.log()}"
            assert moved.rpartition(":")[0] == host.public_ip
            assert moved == hub.endpoints()[node.wireguard_public_key]
            print(f"{kind_name}: after a conntrack flush, {endpoint} -> {moved} in {took:.2f} s")
    finally:
        agent.close()
        hub.stop()
        lab.release(site_namespaces)


# -- the node's connectivity check: a real handshake with the real hub, reported and stored -------


def test_a_node_behind_a_nat_finds_the_hub_reachable_then_not(lab, settings, provider, tmp_path):
    """The agent's check (clawnode.connectivity) on the userspace backend behind a
    port-restricted NAT: with `run_hub` up, the handshake completes (reachable, with the time it
    took) and the signed report is stored on the node; with the hub stopped, none completes in
    5 s (unreachable)."""
    settings.MOLT_HUB_ENDPOINT = HUB_ENDPOINT
    settings.MOLT_HUB_KEEPALIVE_SECONDS = 1
    kind = nat_lab.KINDS_BY_NAME["port-restricted"]
    node, identity = enrol_node(
        provider, hostname="home-rig", gpus=[], observed_ip=None, region="eu-west"
    )
    before = set(lab.namespaces)
    (host,) = lab.site(kind, nat_lab.PROVIDER_NET, ["p"])
    site_namespaces = [ns for ns in lab.namespaces if ns not in before]
    hub = Hub(lab, settings, tmp_path)
    agent = Driver(lab, host.ns, "userspace")
    stopped = False
    try:
        known, _ = _wait_for(lambda: node.wireguard_public_key in hub.endpoints(), 20)
        assert known, f"the hub never added the node as a peer:\n{hub.log()}"
        agent.call(
            "ensure_interface",
            name=lab.wireguard_name("p"),
            private_key=base64.b64encode(identity.wireguard_private_key).decode(),
            listen_port=51820,
            address=f"{node.mesh_address}/16",
        )
        envelope = signed_desired_state(node)
        body = wire.open_envelope(envelope, gateway_identity().public_key, wire.DESIRED_STATE)
        agent.call("reconcile", desired=body)

        reachable = agent.call("connectivity", desired=body)

        assert reachable["hub"] == "reachable", reachable
        assert 1 <= reachable["hub_rtt_ms"] < 5000
        result = agent_check.Result(**reachable)
        assert record_connectivity(node, agent_check.frame(identity, result)["envelope"])
        node.refresh_from_db()
        assert (node.hub_path, node.hub_rtt_ms) == ("reachable", reachable["hub_rtt_ms"])
        print(f"\nhub handshake behind a port-restricted NAT: {reachable['hub_rtt_ms']} ms")

        hub.stop()
        stopped = True
        unreachable = agent.call("connectivity", desired=body, timeout=30)

        assert unreachable["hub"] == "unreachable", unreachable
        assert HUB_ENDPOINT in unreachable["detail"]
    finally:
        agent.close()
        if not stopped:
            hub.stop()
        lab.release(site_namespaces)


# -- a buyer behind a NAT: its mapping stored per job peer, the node sent toward it ----------------


def test_the_hub_stores_a_buyers_mapping_and_the_node_is_told_to_send_to_it(
    lab, settings, provider, tmp_path
):
    """The buyer's client (wireguard-go, given the hub peer exactly as the downloaded wg-quick
    file names it: meshnet.hub.buyer_hub_peer) sits behind a port-restricted NAT; the order's
    job peer has its key. The hub must peer with that key, store the NAT's public mapping on the
    job peer, and the node's signed desired state must then give the job peer that endpoint
    with keepalive (coordinated punching, docs/nat.md)."""
    from meshnet.peers import create_job_peer
    from tests.nat import tunnel

    settings.MOLT_HUB_ENDPOINT = HUB_ENDPOINT
    node, _ = enrol_node(provider, hostname="rig", gpus=[], observed_ip="203.0.113.9")
    [(host,)], site_namespaces = _lab_sites(
        lab, (nat_lab.KINDS_BY_NAME["port-restricted"], nat_lab.BUYER_NET, ["b"])
    )
    hub = Hub(lab, settings, tmp_path)
    buyer = tunnel.start_wireguard(lab, host.ns, "b", 51821, None)
    try:
        peer = create_job_peer(node, buyer.public, ref="order:1")
        known, _ = _wait_for(lambda: buyer.public in hub.endpoints(), 20)
        assert known, f"the hub never added the buyer's key as a peer:\n{hub.log()}"

        started = time.monotonic()
        stored = _buyer_mapping_via_the_hub(lab, buyer, peer)
        took = time.monotonic() - started
        assert stored, f"no buyer mapping stored in {DEADLINE_S:g} s:\n{hub.log()}"
        assert stored.rpartition(":")[0] == host.public_ip != host.address
        assert stored == hub.endpoints()[buyer.public]
        node.refresh_from_db()
        (job,) = [
            p
            for p in wire.DesiredState.from_dict(
                wire.open_envelope(
                    signed_desired_state(node), gateway_identity().public_key, wire.DESIRED_STATE
                )
            ).peers
            if p.kind == "job"
        ]
        assert (job.endpoint, job.persistent_keepalive) == (stored, 25)
        print(f"\nbuyer {host.address}:51821 observed as {stored} in {took:.2f} s")
    finally:
        buyer.stop()
        hub.stop()
        lab.release(site_namespaces)


def test_a_node_and_a_buyer_behind_port_restricted_nats_punch_through(
    lab, settings, provider, tmp_path
):
    """Both behind port-restricted NATs (address-and-port-dependent filtering): the buyer's
    packets to the node's mapping are dropped by the node's NAT until the node sends toward the
    buyer's mapping. The buyer's client is configured as its wg-quick file says (the node at its
    observed mapping, the hub as second peer); the hub stores the buyer's mapping; the node's
    agent applies the signed state that the hub's change pushes (the job peer's endpoint = the
    buyer's mapping, keepalive 25): a handshake on both sides."""
    from meshnet.peers import create_job_peer
    from tests.nat import tunnel

    settings.MOLT_HUB_ENDPOINT = HUB_ENDPOINT
    settings.MOLT_HUB_KEEPALIVE_SECONDS = 1
    kind = nat_lab.KINDS_BY_NAME["port-restricted"]
    node, identity = enrol_node(provider, hostname="home-rig", gpus=[], observed_ip=None)
    [(node_host,), (buyer_host,)], site_namespaces = _lab_sites(
        lab, (kind, nat_lab.PROVIDER_NET, ["p"]), (kind, nat_lab.BUYER_NET, ["b"])
    )
    hub = Hub(lab, settings, tmp_path)
    agent = Driver(lab, node_host.ns, "userspace")
    buyer = tunnel.start_wireguard(lab, buyer_host.ns, "b", 51821, None)
    try:
        _node_interface_up(lab, hub, agent, node, identity)
        agent.call("reconcile", desired=_signed_state_body(node))
        node_endpoint, _ = _wait_for(lambda: _observed(node))
        assert node_endpoint, f"no node mapping stored:\n{hub.log()}"
        node.refresh_from_db()
        assert node.endpoint == node_endpoint

        peer = create_job_peer(node, buyer.public, ref="order:1")
        known, _ = _wait_for(lambda: buyer.public in hub.endpoints(), 20)
        assert known, f"the hub never added the buyer's key:\n{hub.log()}"
        agent.call("reconcile", desired=_signed_state_body(node))  # the job peer, no endpoint
        # The buyer's wg-quick file: the node at its best endpoint, then the hub.
        started = time.monotonic()
        buyer.set_peer(
            lab,
            node.wireguard_public_key,
            "endpoint",
            node.endpoint,
            "persistent-keepalive",
            "25",
            "allowed-ips",
            f"{node.mesh_address}/32",
        )
        stored = _buyer_mapping_via_the_hub(lab, buyer, peer)
        assert stored, f"no buyer mapping stored:\n{hub.log()}"
        assert stored.rpartition(":")[0] == buyer_host.public_ip
        # The control: the buyer's initiation went to the node's mapping and the node's NAT
        # dropped it (the node never sent toward the buyer): no handshake yet.
        assert buyer.handshakes(lab).get(node.wireguard_public_key, 0) == 0

        # The push the hub's change enqueued, applied as the agent does.
        node.refresh_from_db()
        applied = agent.call("reconcile", desired=_signed_state_body(node))
        assert applied["results"] == {buyer.public: "ok"}, applied
        punched_at = time.monotonic()

        def both_handshook() -> bool:
            node_side = agent.call("list_peers").get(buyer.public, {})
            return bool(
                buyer.handshakes(lab).get(node.wireguard_public_key)
                and node_side.get("last_handshake")
            )

        ok, _ = _wait_for(both_handshook, 15)
        assert ok, f"no handshake across the two NATs after the punch:\n{hub.log()}"
        print(
            f"\nport-restricted x port-restricted: buyer mapping stored "
            f"{punched_at - started:.2f} s after the buyer's wg set; handshake "
            f"{time.monotonic() - punched_at:.2f} s after the node applied the punch"
        )
    finally:
        buyer.stop()
        agent.close()
        hub.stop()
        lab.release(site_namespaces)


# -- the whole path: `clawnode join` and `clawnode run` as installed, two behind one NAT ----------


def test_two_clawnodes_behind_one_nat_get_their_own_mappings(lab, settings, provider, tmp_path):
    """Two providers behind one home router, both on WireGuard's default port 51820: the NAT
    can give 51820 to one of them only, so the address the gateway saw their websockets come
    from plus 51820 (the endpoint before the hub) is wrong for the other; the hub's mappings
    are each one's own."""
    settings.MOLT_HUB_ENDPOINT = HUB_ENDPOINT
    [hosts], site_namespaces = _lab_sites(
        lab, (nat_lab.KINDS_BY_NAME["port-restricted"], nat_lab.PROVIDER_NET, ["p", "q"])
    )
    gateway = LabGateway(lab, settings, tmp_path)
    hub = Hub(lab, settings, tmp_path)
    try:
        nodes = []
        for host in hosts:
            state_dir = tmp_path / f"clawnode-{host.address}"
            token = create_enrollment_token(provider).token
            joined = lab.exec(
                host.ns, str(BIN / "clawnode"), "join", "--gateway", gateway.url, "--insecure",
                "--token", token, "--state-dir", str(state_dir),
                "--interface", lab.wireguard_name("p"), "--backend", "userspace",
                "--simulated-gpus", "RTX 4090:1", timeout=60,
            )  # fmt: skip
            match = re.search(r"(node-\d+) joined the mesh", joined.stdout)
            assert match, joined.stdout + joined.stderr
            log = open(tmp_path / f"agent-{host.address}.log", "wb")  # noqa: SIM115
            lab.popen(
                host.ns,
                [str(BIN / "clawnode"), "run", "--state-dir", str(state_dir),
                 "--simulated-gpus", "RTX 4090:1"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
            nodes.append(Node.objects.get(name=match.group(1)))

        def mappings():
            found = dict(
                Node.objects.filter(pk__in=[n.pk for n in nodes]).values_list(
                    "pk", "observed_endpoint"
                )
            )
            return found if all(found.values()) else None

        found, took = _wait_for(mappings)
        assert found, f"mappings not stored in {DEADLINE_S:g} s:\n{gateway.logs()}"
        print(f"\ntwo clawnodes behind one NAT, observed in {took:.2f} s: {sorted(found.values())}")
        hub_view = hub.endpoints()
        for node in nodes:
            node.refresh_from_db()
            assert node.observed_ip == hosts[0].public_ip  # their websockets, through the NAT
            assert node.observed_endpoint.rpartition(":")[0] == hosts[0].public_ip
            assert node.observed_endpoint == hub_view[node.wireguard_public_key]
            assert node.endpoint == node.observed_endpoint
        ports = {node.observed_endpoint.rpartition(":")[2] for node in nodes}
        assert len(ports) == 2, "one NAT gave both nodes the same public port"
        assert ports != {"51820"}

        # An operator revokes one (revoked_at set, as the admin does): the hub drops its peer at
        # its next reconcile, so the revoked node's handshakes no longer reach anything.
        revoked, kept = nodes
        Node.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
        gone, took = _wait_for(lambda: revoked.wireguard_public_key not in hub.endpoints())
        assert gone, f"the hub kept the revoked node's peer:\n{hub.log()}"
        assert kept.wireguard_public_key in hub.endpoints()
        print(f"revoked node's peer removed from the hub in {took:.2f} s")
    except BaseException:
        print(gateway.logs())
        raise
    finally:
        hub.stop()
        gateway.stop()
        lab.release(site_namespaces)
