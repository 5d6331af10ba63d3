"""A desired state the agent refuses for what it is, not for its signature: one that is not an
envelope at all, and a correctly signed one for another node. Neither changes a peer or is
acknowledged, and the gateway is told why in a report frame (the operator reads it there)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from clawnode import wire

from tests.unit.test_agent_daemon_view import GATEWAY, Node, wg_key

pytestmark = [pytest.mark.unit]

OTHER_NODE = "nd_" + "cd" * 16


def feed(node: Node, envelope: Any) -> None:
    asyncio.run(node.agent._apply_desired(node.ws, envelope))


def test_a_desired_state_for_another_node_is_refused_and_reported(tmp_path):
    node = Node(tmp_path)
    mine, theirs = wg_key(), wg_key()
    node.desire({mine: "10.64.0.9/32"})
    acks = len(node.ws.of("ack"))
    state = wire.DesiredState(
        node_id=OTHER_NODE,
        revision=2,
        peers=(wire.PeerSpec(theirs, ("10.64.0.10/32",), "job", "order-9"),),
        issued_at=int(time.time()),
    )

    feed(node, wire.signed_envelope(wire.DESIRED_STATE, state.to_dict(), GATEWAY))

    assert set(node.backend.peers) == {mine}
    assert len(node.ws.of("ack")) == acks
    assert node.ws.sent[-1] == {
        "type": "report",
        "detail": "refused desired state: desired state is for another node",
    }


@pytest.mark.parametrize("envelope", [None, ["desired_state"], "a string"])
def test_a_desired_state_that_is_not_an_envelope_is_refused_and_reported(tmp_path, envelope):
    node = Node(tmp_path)

    feed(node, envelope)

    assert node.backend.peers == {}
    assert node.ws.sent == [
        {
            "type": "report",
            "detail": "refused desired state: desired state is not a signed envelope",
        }
    ]


def test_the_same_revision_sent_again_is_applied_and_acknowledged_again(tmp_path):
    # The gateway resends a revision it has no ack for (a lost ack, a reconnect): the agent
    # must acknowledge it again, or the gateway waits for an ack that never comes. Only an
    # older revision is ignored.
    node = Node(tmp_path)
    envelope = node.envelope({wg_key(): "10.64.0.9/32"})
    feed(node, envelope)
    feed(node, envelope)
    assert [ack["revision"] for ack in node.ws.bodies("ack")] == [1, 1]


def test_the_log_names_a_refusal_and_each_change_a_revision_applied(tmp_path):
    node = Node(tmp_path)
    lines: list[str] = []
    node.agent.say = lines.append
    first, second = sorted([wg_key(), wg_key()])

    feed(node, ["desired_state"])
    envelope = node.envelope({first: "10.64.0.9/32", second: "10.64.0.10/32"})
    feed(node, envelope)
    feed(node, envelope)

    assert lines == [
        "refused a desired state: desired state is not a signed envelope",
        f"revision 1 applied (add {first[:8]}…, add {second[:8]}…)",
        "revision 1 applied (no change)",
    ]
