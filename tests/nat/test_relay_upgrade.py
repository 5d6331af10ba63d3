"""A relayed path upgrading to direct, across the NAT lab (docs/nat.md, "Upgrading a relayed
path"): the agent's side of the move and the buyer's real roam, in both outcomes.

The node is a public site (it declared an endpoint, so it no longer wants a relay) whose job
peer is applied with the agent's own reconcile on its userspace backend
(tests/netns/backend_driver.py); the buyer is plain wireguard-go, its peer for the node at the
relay's buyer port as its wg-quick file says. The relay is `python -m meshnet.relay`
(tests/nat/relayed.py). The signed states are built here as the gateway builds them
(meshnet.desired_state: the relay's provider port, then at the upgrade's start the buyer's
mapping, which for these endpoint-independent mappings is where the relay saw the buyer); the
gateway's own settling on the counts is tests/db/test_relays.py.

- The control: with the tunnel live, a plan with no previous state (a restarted agent) leaves
  the endpoint on the relay; with the state applied before, it moves it to the buyer.
- A full-cone buyer: the node's packets to the buyer's mapping get in, the buyer's client roams
  to the node's address, and the relay stops carrying the pair.
- A port-restricted buyer: its NAT drops them (it never sent to the node), the buyer keeps the
  relay, and the node is roamed back to the relay by the buyer's next packet through it; the
  gateway's give-up, naming the relay again, then changes nothing.
"""

from __future__ import annotations

import base64
import subprocess
import time

import pytest
from clawnode import wire
from clawnode.keys import encode_key, generate_wireguard_keypair
from clawnode.reconcile import named_endpoints

from tests.nat import lab as nat_lab
from tests.nat import relayed, tunnel
from tests.netns.backend_driver import Driver

pytestmark = [pytest.mark.nat]

NODE_ID = "nd_" + "cd" * 16
HANDSHAKE_DEADLINE_S = 12.0
# The buyer's keepalive here (MOLT's wg-quick file says 25 s; the tests wait less): a roam,
# either way, follows the next authenticated packet.
KEEPALIVE = "1"
OUTCOME_S = 10.0


def _state(revision: int, buyer_key: str, endpoint: str) -> wire.DesiredState:
    """The node's desired state as the gateway signs it: the job peer at `endpoint`,
    keepalive 25 (desired_state.PUNCH_KEEPALIVE_SECONDS)."""
    spec = wire.PeerSpec(
        public_key=buyer_key,
        allowed_ips=(f"{tunnel.BUYER_TUNNEL}/32",),
        kind="job",
        ref="order:1",
        endpoint=endpoint,
        persistent_keepalive=25,
    )
    return wire.DesiredState(
        node_id=NODE_ID, revision=revision, peers=(spec,), issued_at=int(time.time())
    )


@pytest.mark.parametrize(("buyer_kind", "roams"), [("full-cone", True), ("port-restricted", False)])
def test_a_relayed_tunnel_moves_direct_where_the_buyers_nat_lets_the_node_in(
    lab, tmp_path, buyer_kind, roams
):
    private, public = generate_wireguard_keypair()
    node_key = encode_key(public)
    before = set(lab.namespaces)
    (node_host,) = lab.site(nat_lab.KINDS_BY_NAME["public"], nat_lab.PROVIDER_NET, ["p"])
    (buyer_host,) = lab.site(nat_lab.KINDS_BY_NAME[buyer_kind], nat_lab.BUYER_NET, ["b"])
    sites = [ns for ns in lab.namespaces if ns not in before]
    agent = Driver(lab, node_host.ns, "userspace")
    buyer = tunnel.start_wireguard(lab, buyer_host.ns, "b", tunnel.BUYER_PORT, tunnel.BUYER_TUNNEL)
    ping: subprocess.Popen | None = None
    try:
        with relayed.relay(lab, tmp_path) as the_relay:
            buyer_port, provider_port = the_relay.allocate("up", buyer.public, node_key)
            relay_for_node = f"{relayed.RELAY_ADDRESS}:{provider_port}"
            relay_for_buyer = f"{relayed.RELAY_ADDRESS}:{buyer_port}"
            node_if = lab.wireguard_name("p")
            agent.call(
                "ensure_interface",
                name=node_if,
                private_key=base64.b64encode(private).decode(),
                listen_port=tunnel.PROVIDER_PORT,
                address=f"{tunnel.PROVIDER_TUNNEL}/32",
                routes=["10.99.0.0/24"],  # the tunnel's network: the node's pings below
            )

            def node_peer() -> dict:
                return agent.call("list_peers").get(buyer.public, {})

            # Relayed: the node's state names the relay's provider port, the buyer's file the
            # relay's buyer port.
            relayed_state = _state(1, buyer.public, relay_for_node)
            agent.call("reconcile", desired=relayed_state.to_dict())
            buyer.set_peer(
                lab, node_key, "endpoint", relay_for_buyer, "persistent-keepalive", KEEPALIVE,
                "allowed-ips", f"{tunnel.PROVIDER_TUNNEL}/32",
            )  # fmt: skip
            assert relayed.wait_for(
                lambda: (
                    node_peer().get("last_handshake", 0) > 0
                    and buyer.handshakes(lab).get(node_key, 0) > 0
                ),
                HANDSHAKE_DEADLINE_S,
            ), f"no handshake through the relay: {the_relay.pair_status('up')}"
            # The relay's status file follows its poll (0.1 s here).
            assert relayed.wait_for(lambda: the_relay.pair_status("up")["buyer"], 2)
            pair = the_relay.pair_status("up")
            mapping = pair["buyer"]  # where the relay (and a hub) sees the buyer
            assert mapping.startswith(buyer_host.public_ip + ":"), pair

            # The upgrade's start: the state names the buyer's mapping. The tunnel is live.
            upgrade = _state(2, buyer.public, mapping)
            restarted = agent.call("plan", desired=upgrade.to_dict())
            assert restarted["moved"] == {}, restarted  # the control: no previous state
            previous = named_endpoints(relayed_state)
            assert agent.call("plan", desired=upgrade.to_dict(), previous=previous)["moved"] == {
                buyer.public: mapping
            }
            applied = agent.call("reconcile", desired=upgrade.to_dict(), previous=previous)
            assert applied["results"] == {buyer.public: "ok"}, applied
            moved_at = time.monotonic()
            # The tenant's traffic: the node's packets now go to the buyer's mapping. (The
            # node's 25 s keepalive would not do here: the buyer's packets, every second,
            # restart its timer.)
            ping = lab.popen(
                node_host.ns,
                ["ping", "-c", "10", "-i", "0.2", "-W", "1", tunnel.BUYER_TUNNEL],
                stdout=subprocess.PIPE,
                text=True,
            )

            direct = f"{node_host.public_ip}:{tunnel.PROVIDER_PORT}"
            if roams:
                # The buyer's client roamed to the node on its first authenticated packet; the
                # node stays on the mapping; the relay stops counting the pair.
                assert relayed.wait_for(
                    lambda: buyer.endpoints(lab).get(node_key) == direct, OUTCOME_S
                ), (buyer.endpoints(lab), the_relay.pair_status("up"))
                roamed_s = time.monotonic() - moved_at
                out, _ = ping.communicate(timeout=10)
                assert ping.returncode == 0, out  # answered, directly
                time.sleep(1)  # a packet the buyer sent through the relay before it roamed
                counted = the_relay.pair_status("up")
                time.sleep(3)  # three of the buyer's keepalives
                assert node_peer()["endpoint"] == mapping
                after = the_relay.pair_status("up")
                assert after["forwarded_bytes"] == counted["forwarded_bytes"], (counted, after)
                assert after.get("kernel_bytes", 0) == counted.get("kernel_bytes", 0), after
                print(f"\n{buyer_kind}: the buyer roamed direct {roamed_s:.2f} s after the move")
            else:
                # The buyer's NAT dropped the node's packets: the buyer keeps the relay, and its
                # next packet through it roams the node back.
                assert relayed.wait_for(
                    lambda: node_peer().get("endpoint") == relay_for_node, OUTCOME_S
                ), (node_peer(), the_relay.pair_status("up"))
                back_s = time.monotonic() - moved_at
                ping.communicate(timeout=10)
                assert buyer.endpoints(lab)[node_key] == relay_for_buyer
                # The give-up names the relay again: nothing left to change.
                given_up = _state(3, buyer.public, relay_for_node)
                assert agent.call(
                    "plan", desired=given_up.to_dict(), previous=named_endpoints(upgrade)
                ) == {"actions": [], "moved": {}}
                print(f"\n{buyer_kind}: the node was roamed back {back_s:.2f} s after the move")
    finally:
        if ping is not None and ping.poll() is None:
            ping.kill()
            ping.wait()
        buyer.stop()
        agent.close()
        lab.release(sites)
