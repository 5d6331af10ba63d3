"""The agent stops for good only on the gateway's signed refusal (issue 15 item 5): a close
code 4403 is a byte anyone on the path can send, so without a refusal signed by the pinned
gateway key, for this node and this connection's challenge, it is a disconnection like any
other and the agent retries."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from clawnode import wire
from clawnode.daemon import Revoked
from clawnode.keys import Identity
from websockets.frames import Close

from tests.unit.test_agent_daemon_view import GATEWAY, Connection, Node

pytestmark = [pytest.mark.unit]

CHALLENGE = "c" * 43  # what Connection.recv sends


class ClosedAs4403(Connection):
    """A connection that delivers `frames`, then is closed with 4403."""

    async def __aiter__(self) -> Any:
        for frame in self.frames:
            yield json.dumps(frame)
        raise websockets.ConnectionClosed(Close(wire.CLOSE_FORBIDDEN, "node revoked"), None)


def refusal(node: Node, *, signer: Identity = GATEWAY, **overrides: Any) -> dict[str, Any]:
    body = {
        "node_id": node.identity.node_id,
        "challenge": CHALLENGE,
        "reason": "node revoked",
        "timestamp": int(time.time()),
        **overrides,
    }
    envelope = wire.signed_envelope(wire.REFUSAL, wire.Refusal.from_dict(body).to_dict(), signer)
    return {"type": "refused", "envelope": envelope}


def session(node: Node, frames: list[dict[str, Any]]) -> None:
    node.ws = ClosedAs4403(frames)
    asyncio.run(node.agent._session(node.ws, asyncio.Event()))


def test_a_signed_refusal_for_this_node_and_connection_stops_the_agent(tmp_path):
    node = Node(tmp_path)

    with pytest.raises(Revoked, match="node revoked"):
        session(node, [refusal(node)])


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([], id="a bare 4403"),
        pytest.param("forged", id="signed by another key"),
        pytest.param("other-node", id="for another node"),
        pytest.param("replayed", id="from another connection"),
        pytest.param([{"type": "refused", "envelope": "nope"}], id="not an envelope"),
    ],
)
def test_anything_less_is_a_disconnection_the_agent_retries(tmp_path, frames):
    node = Node(tmp_path)
    if frames == "forged":
        frames = [refusal(node, signer=Identity.generate())]
    elif frames == "other-node":
        frames = [refusal(node, node_id="nd_" + "ab" * 16)]
    elif frames == "replayed":
        frames = [refusal(node, challenge="d" * 43)]

    with pytest.raises(websockets.ConnectionClosed):  # the run loop's retry, not Revoked
        session(node, frames)
