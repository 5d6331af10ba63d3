"""The agent's side of a multi-node order's private network: each sandbox's spec lists the
members of its order's network (wire.SandboxSpec.mesh); a node-to-node peer may route only those
members' /32s (clawnode.job_peers.check_mesh_peers: a state that asks for more is refused whole);
the firewall allows (sandbox, member) pairs and nothing else of them (clawnode.firewall)."""

from __future__ import annotations

import asyncio
import time

import pytest
from clawnode import wire
from clawnode.firewall import SandboxRule, render_ruleset, sandbox_rules
from clawnode.job_peers import check_mesh_peers

from tests.unit.test_agent_daemon_view import GATEWAY, Node, wg_key

pytestmark = [pytest.mark.unit]

MINE = "10.128.0.33/32"  # this node's sandbox of the order
MATE = "10.128.0.66/32"  # the order's sandbox on the other node
OTHER = "10.128.0.67/32"  # another order's sandbox on the other node


def box(ref: str, address: str, *mesh: str, gpu: int = 0) -> wire.SandboxSpec:
    return wire.SandboxSpec(
        ref=ref, image="img:1", address=address, peer_address="10.64.0.9/32", gpus=(gpu,),
        cpus=1000, memory_mb=1024, disk_gb=1, pids_limit=100, egress=False, ssh_keys=(),
        mesh=mesh,
    )  # fmt: skip


def state(peers=(), sandboxes=()) -> wire.DesiredState:
    return wire.DesiredState(
        node_id="nd_" + "ab" * 16,
        revision=1,
        peers=tuple(peers),
        issued_at=int(time.time()),
        sandboxes=tuple(sandboxes),
    )


def node_peer(*allowed: str) -> wire.PeerSpec:
    return wire.PeerSpec(wg_key(), allowed, "mesh", "node:nd_" + "cd" * 16, "192.0.2.7:51820", 25)


# -- the wire -----------------------------------------------------------------------------------


def test_a_sandbox_without_members_is_written_as_before_and_one_with_members_round_trips():
    alone = box("order:1", MINE)
    assert "mesh" not in alone.to_dict()  # an agent that predates it still takes the state
    member = box("order:1", MINE, MATE)
    assert wire.SandboxSpec.from_dict(member.to_dict()) == member


@pytest.mark.parametrize("mesh", [["10.128.0.0/27"], ["10.128.0.66/32", "10.128.0.66/32"], ["x"]])
def test_members_are_distinct_single_addresses(mesh):
    data = {**box("order:1", MINE).to_dict(), "mesh": mesh}
    with pytest.raises(wire.ProtocolError, match="mesh"):
        wire.SandboxSpec.from_dict(data)


# -- the agent's check of node-to-node peers ------------------------------------------------------


def test_a_node_peer_routing_the_members_of_this_nodes_sandboxes_passes():
    check_mesh_peers(
        state(
            [node_peer(MATE, OTHER)],
            [box("order:1", MINE, MATE), box("order:2", "10.128.0.34/32", OTHER, gpu=1)],
        )
    )


@pytest.mark.parametrize(
    "allowed",
    [
        (OTHER,),  # a sandbox of the other node no order of this node includes
        ("10.100.128.9/32",),  # the other node itself
        ("192.168.1.10/32",),  # its LAN
        ("10.128.0.64/27",),  # its whole sandbox subnet
        ("0.0.0.0/0",),  # everything
        (MINE,),  # this node's own sandbox
        ("10.64.0.9/32",),  # a buyer
    ],
)
def test_a_node_peer_routing_anything_else_is_refused_naming_it(allowed):
    desired = state([node_peer(*allowed)], [box("order:1", MINE, MATE, MINE)])
    with pytest.raises(wire.ProtocolError, match=r"mesh peer node:nd_\w+ routes"):
        check_mesh_peers(desired)


def test_members_outside_the_sandbox_blocks_are_refused():
    with pytest.raises(wire.ProtocolError, match="outside the sandbox blocks"):
        check_mesh_peers(state([], [box("order:1", MINE, "10.100.128.9/32")]))


def test_the_hub_is_not_a_node_peer():
    hub = wire.PeerSpec(wg_key(), ("10.100.0.1/32",), "mesh", "hub", "198.51.100.1:51820", 25)
    check_mesh_peers(state([hub]))


def test_the_daemon_refuses_a_state_whose_node_peer_routes_a_non_member_and_keeps_its_peers(
    tmp_path,
):
    node = Node(tmp_path)
    mine = wg_key()
    node.desire({mine: "10.64.0.9/32"})
    acks = len(node.ws.of("ack"))
    node.revision += 1
    desired = wire.DesiredState(
        node_id=node.identity.node_id,
        revision=node.revision,
        peers=(wire.PeerSpec(mine, ("10.64.0.9/32",), "job", "order-0"), node_peer(OTHER)),
        issued_at=int(time.time()),
    )
    envelope = wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), GATEWAY)
    asyncio.run(node.agent._apply_desired(node.ws, envelope))
    assert set(node.backend.peers) == {mine}
    assert len(node.ws.of("ack")) == acks
    assert "not a sandbox of a job of this node on another node" in node.ws.sent[-1]["detail"]


# -- the firewall ---------------------------------------------------------------------------------

A = SandboxRule("msbx0123456789a", "10.128.0.33/32", "10.64.0.7/32", False, ("10.128.0.66/32",))
B = SandboxRule("msbx0123456789b", "10.128.0.34/32", "10.64.0.8/32", False, ("10.128.0.67/32",))


def rules_of(script: str, chain: str) -> list[str]:
    body = script.split(f"\tchain {chain} {{\n", 1)[1].split("\t}\n", 1)[0]
    return [line.strip() for line in body.splitlines()[1:]]


def test_the_firewall_takes_the_members_from_the_desired_state():
    rules = sandbox_rules(state([], [box("order:1", MINE, MATE)]))
    assert [rule.mesh for rule in rules] == [(MATE,)]


def test_members_reach_their_own_sandbox_both_ways_and_nothing_else():
    script = render_ruleset("molt0", "10.100.128.5", [A, B])
    assert (
        "set members { type ipv4_addr . ipv4_addr; "
        "elements = { 10.128.0.33 . 10.128.0.66, 10.128.0.34 . 10.128.0.67 }; }"
    ) in script
    forward = rules_of(script, "forward")
    inward = 'iifname "molt0" oifname "msbx*" ip daddr . ip saddr @members accept'
    outward = 'iifname "msbx*" oifname "molt0" ip saddr . ip daddr @members accept'
    local = 'iifname "msbx*" oifname "msbx*" ip saddr . ip daddr @members accept'
    # After the anti-spoofing rule (a sandbox speaks from its own address only), before every
    # drop of the tunnel, of the sandboxes and of the private ranges (which hold the members)
    spoof = forward.index('iifname "msbx*" iifname . ip saddr != @owned counter drop')
    for allow in (inward, outward, local):
        assert spoof < forward.index(allow) < forward.index('iifname "molt0" counter drop')
    assert forward.index(local) < forward.index('oifname "msbx*" counter drop')
    # And no member reaches the host
    assert "set meshed { type ipv4_addr; elements = { 10.128.0.66, 10.128.0.67 }; }" in script
    input_ = rules_of(script, "input")
    assert input_.index('iifname "molt0" ip saddr @meshed counter drop') < input_.index(
        'iifname "molt0" ip daddr != 10.100.128.5 counter drop'
    )


def test_one_sandbox_held_twice_while_its_members_change_renders_each_element_once():
    moved = SandboxRule(A.veth, A.address, A.peer_address, A.egress, ("10.128.0.70/32",))
    script = render_ruleset("molt0", "10.100.128.5", sorted({A, moved}))
    assert script.count('"msbx0123456789a" . 10.128.0.33') == 1
