"""The agent's own check of the job peers a desired state asks for: each may route only one
address of the job pool the gateway assigned at enrolment (``job_network`` in enrollment.json).
And of its node-to-node peers (kind "mesh", every one but the gateway's hub): each may route
only addresses that a sandbox of the same state lists as a member of its own job's private
network on another node (SandboxSpec.mesh, docs/network.md), all inside the IP plan's sandbox
blocks: never the other node itself, its LAN, a buyer, or anything of this node.

A signed state is the gateway's word, but the gateway is one compromise or one bug away from
asking for a job peer that routes the mesh, the gateway's hub, or the whole internet through a
buyer's tunnel. The pool is fixed at enrolment, so the agent can hold the gateway to it. A state
that breaks it is refused whole (clawnode.daemon: peers kept, no ack, a report), like any other
state that does not hold, rather than applied without that peer: a partial apply would be
acknowledged as the plan, and a gateway that sends such a state is not to be followed at all.

Pure: stdlib only.
"""

from __future__ import annotations

import ipaddress
import socket

from . import wire
from .state import SANDBOX_NETWORK

HUB_REF = "hub"  # meshnet.hub.HUB_REF: the one mesh peer that is not another node


def check_job_peers(
    desired: wire.DesiredState, job_network: str, known: wire.DesiredState | None = None
) -> None:
    """Raise ProtocolError naming the first job peer whose allowed IPs are not all /32s inside
    ``job_network``. Mesh peers (the gateway's hub) are not job peers and not checked here.
    Peers the same as in ``known`` (the last state applied, which passed) are not checked
    again: a state of thousands of peers usually changes a few."""
    pool = ipaddress.IPv4Network(job_network)
    first, last = int(pool.network_address), int(pool.broadcast_address)
    passed = set(known.peers) if known is not None else set()
    for peer in desired.peers:
        if peer.kind != "job" or peer in passed:
            continue
        for allowed in peer.allowed_ips:
            # Allowed IPs arrive canonical (wire.fields.networks), so "a.b.c.d/32" is the only
            # spelling of a single IPv4 address; compared as integers, not ip_network objects
            # (a tenth of the cost, at thousands of peers).
            address, _, length = allowed.partition("/")
            try:
                inside = length == "32" and first <= _ipv4_int(address) <= last
            except OSError:  # an IPv6 network
                inside = False
            if not inside:
                raise wire.ProtocolError(
                    f"job peer {peer.ref or peer.public_key[:8]} routes {allowed}, not one "
                    f"address of the job pool {pool}"
                )


def _ipv4_int(address: str) -> int:
    return int.from_bytes(socket.inet_aton(address), "big")


def check_mesh_peers(desired: wire.DesiredState) -> None:
    """Raise ProtocolError naming the first node-to-node peer that routes an address no sandbox
    of ``desired`` lists in its ``mesh`` (or one of this node's own sandboxes), and the first
    sandbox whose ``mesh`` names an address outside the sandbox blocks (SANDBOX_NETWORK).
    Refused whole, as a bad job peer is (see above)."""
    blocks = ipaddress.IPv4Network(SANDBOX_NETWORK)
    first, last = int(blocks.network_address), int(blocks.broadcast_address)
    own = {box.address for box in desired.sandboxes}
    reachable: set[str] = set()
    for box in desired.sandboxes:
        for mate in box.mesh:
            # Canonical /32s (wire.SandboxSpec.mesh checks the spelling).
            if not first <= _ipv4_int(mate.partition("/")[0]) <= last:
                raise wire.ProtocolError(
                    f"sandbox {box.ref} lists {mate} in its private network, outside the "
                    f"sandbox blocks {blocks}"
                )
        reachable.update(box.mesh)
    reachable -= own
    for peer in desired.peers:
        if peer.kind != "mesh" or peer.ref == HUB_REF:
            continue
        for allowed in peer.allowed_ips:
            if allowed not in reachable:
                raise wire.ProtocolError(
                    f"mesh peer {peer.ref or peer.public_key[:8]} routes {allowed}, not a "
                    "sandbox of a job of this node on another node"
                )
