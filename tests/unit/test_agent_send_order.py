"""The order of the sends between two nodes (clawnode.send_order, docs/nat.md): both nodes of a
multi-node order get each other as a peer in one push, and two handshake initiations that cross
can leave the tunnel dead for two minutes in wireguard-go. So the node whose id sorts first
sends at once, the other adds the peer without endpoint or keepalive and gives them a stagger
later, and then never the endpoint of a peer that handshook meanwhile.

The plan's part is pure (clocks given); the daemon's is run on two agents over in-memory
backends, their sessions side by side, with every change either device is asked for logged in
one sequence (the order the two devices would start sending in).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from clawnode import wire
from clawnode.backends.base import PeerStatus
from clawnode.backends.memory import FakeBackend
from clawnode.keys import Identity
from clawnode.reconcile import Add, Update, plan
from clawnode.send_order import SendOrder, sends_second

from tests.unit.test_agent_daemon_view import GATEWAY, Connection, Node, wg_key

pytestmark = [pytest.mark.unit]

IDS = {n: Identity.from_seed(bytes([n]) * 32) for n in (1, 2)}
FIRST, SECOND = sorted(IDS, key=lambda n: IDS[n].node_id)  # the node whose id sorts first sends
BOX = {FIRST: "10.128.0.33/32", SECOND: "10.128.0.65/32"}  # each node's sandbox of the order
ENDPOINT = {FIRST: "192.0.2.1:51820", SECOND: "192.0.2.2:51820"}
ROAMED = "198.51.100.7:40000"  # where the first side's initiation came from (its NAT's mapping)
NOW, CLOCK = 1_800_000_000, 1000.0


def mesh_peer(other: int, endpoint: str | None = None) -> wire.PeerSpec:
    """This node's peer to node `other`, as meshnet.mesh gives it."""
    return wire.PeerSpec(
        IDS[other].wireguard_public_key_b64, (BOX[other],), "mesh", f"node:{IDS[other].node_id}",
        ENDPOINT[other] if endpoint is None else endpoint, 25,
    )  # fmt: skip


def state_of(n: int, *peers: wire.PeerSpec, revision: int = 1) -> wire.DesiredState:
    other = SECOND if n == FIRST else FIRST
    sandbox = wire.SandboxSpec(
        ref=f"order:{n}", image="img:1", address=BOX[n], peer_address="10.64.0.9/32", gpus=(0,),
        cpus=1000, memory_mb=1024, disk_gb=1, pids_limit=100, egress=False, ssh_keys=(),
        mesh=(BOX[other],),
    )  # fmt: skip
    return wire.DesiredState(
        node_id=IDS[n].node_id,
        revision=revision,
        peers=peers or (mesh_peer(other),),
        issued_at=int(time.time()),
        sandboxes=(sandbox,),
    )


KEY = IDS[FIRST].wireguard_public_key_b64  # the second side's peer: the first node


# -- who goes first ------------------------------------------------------------------------------


def test_exactly_one_node_of_a_pair_sends_second_and_both_agree_from_their_own_states():
    assert not sends_second(state_of(FIRST), mesh_peer(SECOND))
    assert sends_second(state_of(SECOND), mesh_peer(FIRST))


@pytest.mark.parametrize(
    "peer",
    [
        wire.PeerSpec(wg_key(), ("10.64.0.9/32",), "job", "order-1", "192.0.2.9:4000", 25),
        wire.PeerSpec(wg_key(), ("10.100.0.1/32",), "mesh", "hub", "198.51.100.1:51820", 25),
        replace(mesh_peer(FIRST), endpoint="", persistent_keepalive=0),  # nowhere to send yet
    ],
    ids=["job", "hub", "no-endpoint"],
)
def test_job_peers_the_hub_and_a_node_without_endpoint_are_not_ordered(peer):
    desired = state_of(SECOND, peer)
    assert not sends_second(desired, peer)
    assert SendOrder().order(desired, {}, plan(desired, {}), NOW, CLOCK) == plan(desired, {})


# -- the plan ------------------------------------------------------------------------------------


def test_the_first_side_adds_the_peer_with_endpoint_and_keepalive_at_once():
    desired = state_of(FIRST)
    order = SendOrder(stagger=1.0)
    (add,) = order.order(desired, {}, plan(desired, {}), NOW, CLOCK)
    assert add == Add(IDS[SECOND].wireguard_public_key_b64, (BOX[SECOND],), ENDPOINT[SECOND], 25)
    assert order.pending() is None


def second_side_after(
    order: SendOrder, device: dict[str, PeerStatus], clock: float, endpoint: str | None = None
) -> list:
    desired = state_of(SECOND, mesh_peer(FIRST, endpoint))
    return order.order(desired, device, plan(desired, device, now=NOW), NOW, clock)


def test_the_second_side_adds_the_peer_silent_then_gives_it_endpoint_and_keepalive_when_due():
    order = SendOrder(stagger=1.0)
    # At once: routed (the first side's initiation is answered), but nothing sent from here.
    assert second_side_after(order, {}, CLOCK) == [Add(KEY, (BOX[FIRST],))]
    assert order.pending() == CLOCK + 1.0
    silent = {KEY: PeerStatus(public_key=KEY, allowed_ips=(BOX[FIRST],))}
    # Any plan before it is due (another revision, the drift check) keeps it silent.
    assert second_side_after(order, silent, CLOCK + 0.5) == []
    # Due, and no handshake came: it starts sending.
    assert order.release(CLOCK + 1.0) == {KEY}
    assert second_side_after(order, silent, CLOCK + 1.0) == [
        Update(KEY, (BOX[FIRST],), ENDPOINT[FIRST], 25, ("endpoint", "keepalive"))
    ]
    assert order.pending() is None


def test_a_handshake_the_first_side_brought_keeps_its_endpoint_only_the_keepalive_is_turned_on():
    order = SendOrder(stagger=1.0)
    second_side_after(order, {}, CLOCK)
    # The first side's initiation arrived from its NAT's mapping: WireGuard roamed there.
    answered = {
        KEY: PeerStatus(
            public_key=KEY, allowed_ips=(BOX[FIRST],), endpoint=ROAMED, last_handshake=NOW - 1
        )
    }
    order.release(CLOCK + 1.0)
    # No endpoint (set_peer keeps the one WireGuard learned); the keepalive goes over the session.
    assert second_side_after(order, answered, CLOCK + 1.0) == [
        Update(KEY, (BOX[FIRST],), "", 25, ("keepalive",))
    ]


def test_other_changes_of_a_held_peer_apply_at_once():
    order = SendOrder(stagger=1.0)
    second_side_after(order, {}, CLOCK)
    routed_elsewhere = {KEY: PeerStatus(public_key=KEY, allowed_ips=("10.128.0.40/32",))}
    assert second_side_after(order, routed_elsewhere, CLOCK + 0.5) == [
        Update(KEY, (BOX[FIRST],), "", 0, ("allowed_ips",))
    ]


def test_a_new_endpoint_for_a_peer_without_session_is_held_afresh():
    order = SendOrder(stagger=1.0)
    second_side_after(order, {}, CLOCK)
    order.release(CLOCK + 1.0)
    # Sending to its old endpoint, no session: the gateway names another one (the other node
    # moved, and may be starting toward this one anew).
    old = {
        KEY: PeerStatus(
            public_key=KEY, allowed_ips=(BOX[FIRST],), endpoint=ENDPOINT[FIRST],
            persistent_keepalive=25,
        )
    }  # fmt: skip
    assert second_side_after(order, old, CLOCK + 50, endpoint="192.0.2.3:51820") == []
    assert order.pending() == CLOCK + 51
    order.release(CLOCK + 51)
    assert second_side_after(order, old, CLOCK + 51, endpoint="192.0.2.3:51820") == [
        Update(KEY, (BOX[FIRST],), "192.0.2.3:51820", 25, ("endpoint",))
    ]


# -- the daemon: two agents side by side ---------------------------------------------------------


class Logged(FakeBackend):
    """A device that logs each change, with the node it belongs to, in a sequence shared by both
    nodes: the order in which they would start sending."""

    def __init__(self, node: int, log: list[tuple[int, str, str, int]]) -> None:
        super().__init__()
        self.node, self.log = node, log

    def set_peer(self, public_key: str, allowed_ips: Any, endpoint: str = "", keepalive: int = 0):
        super().set_peer(public_key, allowed_ips, endpoint=endpoint, keepalive=keepalive)
        self.log.append((self.node, public_key, endpoint, keepalive))


class OpenUntil(Connection):
    """A connection that delivers its frames, then stays open until `done()`."""

    def __init__(self, frames: list[dict[str, Any]], done: Any) -> None:
        super().__init__(frames)
        self.done = done

    async def __aiter__(self) -> Any:
        for frame in self.frames:
            yield json.dumps(frame)
        while not self.done():
            await asyncio.sleep(0.005)


def agent_node(tmp_path: Path, n: int, log: list, stagger: float, sampling: bool = False) -> Node:
    node = Node(tmp_path / str(n), backend=Logged(n, log))
    node.identity = IDS[n]  # the agent of node n, its device already up
    node.agent = node._agent(node.state_dir)
    node.agent._order.stagger = stagger
    if not sampling:  # only the agent's own wake-up may release a held peer, not a sample
        node.agent.timing = replace(node.agent.timing, metering=3600)
    return node


def sending(node: Node) -> bool:
    return any(peer.persistent_keepalive for peer in node.backend.peers.values())


def run_both(nodes: dict[int, Node], answered: bool = False) -> None:
    """One session each, the same push to both at once, until both send to each other.
    `answered`: the first side's initiation is answered before the second side's is due (as
    WireGuard would show it: a handshake, the endpoint roamed to where it came from)."""

    async def session(n: int) -> None:
        def done() -> bool:
            if answered and n == SECOND and KEY in nodes[n].backend.peers:
                peer = nodes[n].backend.peers[KEY]
                if not peer.last_handshake:
                    nodes[n].backend.peers[KEY] = replace(
                        peer, endpoint=ROAMED, last_handshake=int(time.time())
                    )
            return all(sending(node) for node in nodes.values())

        envelope = wire.signed_envelope(wire.DESIRED_STATE, state_of(n).to_dict(), GATEWAY)
        ws = OpenUntil([{"type": "desired_state", "envelope": envelope}], done)
        await asyncio.wait_for(nodes[n].agent._session(ws, asyncio.Event()), 10)

    async def both() -> None:
        await asyncio.gather(session(FIRST), session(SECOND))

    asyncio.run(both())


def test_the_second_node_starts_sending_after_the_first_and_not_at_once(tmp_path):
    log: list[tuple[int, str, str, int]] = []
    nodes = {n: agent_node(tmp_path, n, log, stagger=1.0) for n in IDS}
    run_both(nodes)
    sends = [(node, endpoint) for node, _, endpoint, keepalive in log if keepalive]
    # Each node sends once, the first node's first; the second added the peer silent before.
    assert sends == [(FIRST, ENDPOINT[SECOND]), (SECOND, ENDPOINT[FIRST])]
    assert (SECOND, KEY, "", 0) in log[: log.index((SECOND, KEY, ENDPOINT[FIRST], 25))]
    assert nodes[SECOND].backend.peers[KEY].endpoint == ENDPOINT[FIRST]


def test_the_second_node_keeps_the_endpoint_a_handshake_brought_and_only_turns_keepalive_on(
    tmp_path,
):
    log: list[tuple[int, str, str, int]] = []
    nodes = {n: agent_node(tmp_path, n, log, stagger=1.0) for n in IDS}
    run_both(nodes, answered=True)
    assert [entry for entry in log if entry[0] == SECOND] == [
        (SECOND, KEY, "", 0),  # added silent
        (SECOND, KEY, "", 25),  # keepalive over the session, the roamed endpoint kept
    ]
    assert nodes[SECOND].backend.peers[KEY].endpoint == ROAMED


def test_a_held_peer_is_not_drift_the_metering_sample_puts_back(tmp_path):
    node = agent_node(tmp_path, SECOND, [], stagger=3600, sampling=True)
    envelope = wire.signed_envelope(wire.DESIRED_STATE, state_of(SECOND).to_dict(), GATEWAY)
    asyncio.run(node.agent._apply_desired(node.ws, envelope))
    node.sample()
    peer = node.backend.peers[KEY]
    assert (peer.endpoint, peer.persistent_keepalive) == ("", 0)
    assert not [frame for frame in node.ws.of("report") if "drifted" in frame["detail"]]


def test_an_endpoint_change_for_a_second_sorted_node_peer_with_a_live_session_is_not_held_back(
    tmp_path,
):
    # The second side's peer is up and handshaking at the endpoint the gateway named: the
    # gateway then names another one (docs/nat.md, "Upgrading a relayed path"). A handshake is
    # live, so the change cannot make the device initiate: it is applied with the revision, not
    # a stagger later (here never: the stagger is an hour).
    node = agent_node(tmp_path, SECOND, [], stagger=3600)
    live = PeerStatus(
        public_key=KEY, allowed_ips=(BOX[FIRST],), endpoint=ENDPOINT[FIRST],
        last_handshake=int(time.time()), persistent_keepalive=25,
    )  # fmt: skip
    node.backend.peers[KEY] = live
    moved = "192.0.2.3:51820"
    for revision, endpoint in ((1, None), (2, moved)):
        desired = state_of(SECOND, mesh_peer(FIRST, endpoint), revision=revision)
        envelope = wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), GATEWAY)
        asyncio.run(node.agent._apply_desired(node.ws, envelope))
    assert node.backend.peers[KEY].endpoint == moved
    assert node.agent._order.pending() is None
