"""The agent holds the gateway to the job pool of its enrolment: a job peer may route only /32s
inside it (clawnode.job_peers); a signed state that asks for more is refused whole."""

from __future__ import annotations

import asyncio
import time

import pytest
from clawnode import wire
from clawnode.job_peers import check_job_peers

from tests.unit.test_agent_daemon_view import Node, wg_key

pytestmark = [pytest.mark.unit]

POOL = "10.64.0.0/11"


def state(*peers: wire.PeerSpec) -> wire.DesiredState:
    return wire.DesiredState(
        node_id="nd_" + "ab" * 16, revision=1, peers=peers, issued_at=int(time.time())
    )


def job(*allowed: str) -> wire.PeerSpec:
    return wire.PeerSpec(wg_key(), allowed, "job", "order:1")


@pytest.mark.parametrize("allowed", [("10.64.0.1/32",), ("10.95.255.254/32",)])
def test_single_addresses_of_the_pool_pass(allowed):
    check_job_peers(state(job(*allowed)), POOL)


@pytest.mark.parametrize(
    "allowed",
    [
        ("10.64.0.0/24",),  # a whole network, though inside the pool
        ("10.100.128.9/32",),  # the mesh: another node's address
        ("10.100.0.1/32",),  # the gateway's hub
        ("0.0.0.0/0",),  # everything through a buyer's tunnel
        ("10.64.0.1/32", "192.0.2.1/32"),  # one good, one not
        ("10.96.0.1/32",),  # just past the pool
    ],
)
def test_anything_else_is_refused_naming_the_peer(allowed):
    with pytest.raises(wire.ProtocolError, match=r"job peer order:1 routes .* job pool"):
        check_job_peers(state(job(*allowed)), POOL)


def test_mesh_peers_are_not_job_peers():
    hub = wire.PeerSpec(wg_key(), ("10.100.0.1/32",), "mesh", "hub")
    check_job_peers(state(hub, job("10.64.0.2/32")), POOL)


def test_the_daemon_refuses_a_state_with_a_job_peer_outside_its_pool_and_keeps_its_peers(
    tmp_path,
):
    node = Node(tmp_path)
    mine = wg_key()
    node.desire({mine: "10.64.0.9/32"})
    acks = len(node.ws.of("ack"))

    # Correctly signed by the pinned gateway key: refused for what it asks.
    envelope = node.envelope({mine: "10.64.0.9/32", wg_key(): "10.100.128.2/32"})
    asyncio.run(node.agent._apply_desired(node.ws, envelope))

    assert set(node.backend.peers) == {mine}
    assert len(node.ws.of("ack")) == acks
    assert node.ws.sent[-1]["type"] == "report"
    assert "not one address of the job pool 10.64.0.0/11" in node.ws.sent[-1]["detail"]


def test_a_peer_unchanged_since_the_last_state_is_not_checked_again_but_a_changed_one_is():
    peer = job("10.64.0.1/32")
    last = state(peer)
    # Checked when it was applied, so skipped now: under this other pool it would be refused.
    check_job_peers(state(peer), "10.80.0.0/12", known=last)
    moved = wire.PeerSpec(peer.public_key, ("10.100.0.1/32",), "job", "order:1")
    with pytest.raises(wire.ProtocolError):
        check_job_peers(state(moved), POOL, known=last)
