"""The message types of the wire protocol: the bodies of the signed messages and what they
carry. Each is a frozen dataclass on ``schema.Message``; its fields name their checks
(clawnode.wire.fields), from which the constructor's validation, ``from_dict`` and ``to_dict``
are derived.

Pure: stdlib + PyNaCl, no Django.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from ..keys import parse_ed25519_public_key
from . import fields
from .fields import NONCE_RE, ProtocolError
from .schema import Message, items

__all__ = [
    "PEER_KINDS",
    "Ack",
    "AgentAuth",
    "DesiredState",
    "EnrollRequest",
    "GpuInfo",
    "MeteringSample",
    "PeerCounters",
    "PeerResult",
    "PeerSpec",
    "Removed",
]

PEER_KINDS = ("job", "mesh")
MAX_PEERS = 65535

_NONCE = fields.pattern(NONCE_RE, 64, "22-64 URL-safe base64 characters")
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 random bytes, urlsafe b64 unpadded

Integer = Annotated[int, fields.integer()]
NodeId = Annotated[str, fields.node_id]
WireGuardKey = Annotated[str, fields.wireguard_key]


@dataclass(frozen=True)
class GpuInfo(Message):
    index: Annotated[int, fields.integer(0, 1023)]
    name: Annotated[str, fields.text(256)]
    memory_mb: Annotated[int, fields.integer(0, 2**31 - 1)]
    uuid: Annotated[str, fields.text(128)]
    driver_version: Annotated[str, fields.text(64, empty=True)] = ""
    cuda_version: Annotated[str, fields.text(64, empty=True)] = ""
    # True for the named stand-in used where no NVIDIA GPU exists
    simulated: Annotated[bool, fields.boolean] = False


@dataclass(frozen=True)
class EnrollRequest(Message):
    """Body of an ENROLL message, signed by the new node's identity key."""

    token: Annotated[str, fields.text(256)]
    identity_public_key: Annotated[str, fields.ed25519_key]  # base64 Ed25519
    wireguard_public_key: WireGuardKey  # base64 X25519
    hostname: Annotated[str, fields.text(253)]
    listen_port: Annotated[int, fields.integer(1, 65535)]
    # "" (gateway uses the source address it sees) or host:port
    endpoint: Annotated[str, fields.endpoint]
    gpus: Annotated[tuple[GpuInfo, ...], items(GpuInfo, 64)]
    timestamp: Integer  # Unix seconds; with nonce, for replay refusal (check_fresh)
    nonce: Annotated[str, _NONCE]

    @property
    def identity_key(self) -> bytes:
        return parse_ed25519_public_key(self.identity_public_key)


@dataclass(frozen=True)
class PeerSpec(Message):
    """One WireGuard peer a node should have."""

    public_key: WireGuardKey  # base64 X25519
    # canonical CIDR strings, e.g. "10.100.128.9/32"
    allowed_ips: Annotated[tuple[str, ...], fields.networks(256)]
    kind: Annotated[Literal["job", "mesh"], fields.choice(*PEER_KINDS)]
    # what the peer is for: an order id (job) or a node id (mesh)
    ref: Annotated[str, fields.text(128)]
    endpoint: Annotated[str, fields.endpoint] = ""
    # seconds; 0 = off
    persistent_keepalive: Annotated[int, fields.integer(0, 65535)] = 0

    def written_as(self, data: object) -> bool:
        """Whether ``data`` is exactly this peer as JSON carries it: a dict of all six fields,
        each of the JSON type (str, list of str, int) and equal to this peer's value.

        from_dict of such data gives a PeerSpec equal to this one (checking is a function of
        those values alone), so a parser that already checked this one may take it instead:
        DesiredState.from_dict(..., known=) with the previous state, where most peers are
        unchanged from one revision to the next.
        """
        if type(data) is not dict or len(data) != 6:
            return False
        try:
            public_key, allowed = data["public_key"], data["allowed_ips"]
            kind, ref, endpoint = data["kind"], data["ref"], data["endpoint"]
            keepalive = data["persistent_keepalive"]
        except KeyError:
            return False
        return (
            type(public_key) is str
            and public_key == self.public_key
            and type(allowed) is list
            and len(allowed) == len(self.allowed_ips)
            and all(type(text) is str for text in allowed)
            and tuple(allowed) == self.allowed_ips
            and type(kind) is str
            and kind == self.kind
            and type(ref) is str
            and ref == self.ref
            and type(endpoint) is str
            and endpoint == self.endpoint
            and type(keepalive) is int
            and keepalive == self.persistent_keepalive
        )


def _one_owner(peers: tuple[PeerSpec, ...], name: str) -> tuple[PeerSpec, ...]:
    """WireGuard keeps one peer per key and one owner per allowed network (the later peer
    silently takes it over), so duplicates would misroute traffic."""
    keys: set[str] = set()
    networks: set[str] = set()
    for i, peer in enumerate(peers):
        if peer.public_key in keys:
            raise ProtocolError(
                f"{name}[{i}].public_key is already used by another peer",
                f"{name}[{i}].public_key",
            )
        keys.add(peer.public_key)
        for net in peer.allowed_ips:
            if net in networks:
                raise ProtocolError(
                    f"{name}[{i}].allowed_ips {net} is already routed to another peer",
                    f"{name}[{i}].allowed_ips",
                )
            networks.add(net)
    return peers


@dataclass(frozen=True)
class DesiredState(Message):
    """Body of a DESIRED_STATE message: the full peer set of one node, signed by the gateway.

    Level-triggered: the agent keeps the highest revision it has applied and ignores lower ones.
    """

    node_id: NodeId
    revision: Integer
    peers: Annotated[tuple[PeerSpec, ...], items(PeerSpec, MAX_PEERS), _one_owner]
    issued_at: Integer  # Unix seconds

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, known: DesiredState | None = None) -> Self:
        """Parse and check ``data``. ``known``: an earlier state already checked (the agent's
        last one); a peer written exactly as one of its peers (PeerSpec.written_as) is taken
        from it instead of being checked again. What is accepted or refused is the same."""
        if known is not None and known.peers and isinstance(data, Mapping):
            given = data.get("peers")
            if isinstance(given, (list, tuple)) and len(given) <= MAX_PEERS:
                previous = {peer.public_key: peer for peer in known.peers}
                data = {**data, "peers": [_known_peer(item, previous) for item in given]}
        return super().from_dict(data)


def _known_peer(item: object, previous: Mapping[str, PeerSpec]) -> object:
    """The checked PeerSpec ``item`` is written as, else ``item`` itself (to be checked)."""
    if type(item) is dict:
        key = item.get("public_key")
        if type(key) is str:
            spec = previous.get(key)
            if spec is not None and spec.written_as(item):
                return spec
    return item


@dataclass(frozen=True)
class AgentAuth(Message):
    """Body of an AGENT_AUTH message: the node proves its identity by signing the gateway's
    per-connection challenge, so a recorded answer is useless on any other connection."""

    node_id: NodeId
    challenge: Annotated[str, fields.pattern(_CHALLENGE_RE, 43, "43 URL-safe base64 characters")]
    timestamp: Integer


@dataclass(frozen=True)
class PeerResult(Message):
    """How applying one peer of a desired state went."""

    public_key: WireGuardKey
    ok: Annotated[bool, fields.boolean]
    detail: Annotated[str, fields.text(500, empty=True)] = ""


@dataclass(frozen=True)
class Ack(Message):
    """Body of an ACK message: the agent applied desired state `revision`, peer by peer.

    `results` covers the peers the revision changed; a desired peer left out is one the
    interface already had as desired. `removing` names every peer still on the interface that
    the revision no longer has: cut off, but its final counters not yet read, so the gateway
    neither settles it nor closes its key until a REMOVED message names it. A peer the
    revision took off that is in neither list is gone from the interface."""

    node_id: NodeId
    revision: Integer
    results: Annotated[tuple[PeerResult, ...], items(PeerResult, MAX_PEERS)]
    timestamp: Integer
    removing: Annotated[tuple[str, ...], fields.distinct_keys] = ()

    @property
    def failed_keys(self) -> frozenset[str]:
        return frozenset(r.public_key for r in self.results if not r.ok)


def _some(keys: tuple[str, ...], name: str) -> tuple[str, ...]:
    if not keys:
        raise ProtocolError(f"{name} must name at least one peer", name)
    return keys


@dataclass(frozen=True)
class Removed(Message):
    """Body of a REMOVED message: these peers, once named in an ack's `removing`, are off the
    interface now. Their final counters went in a metering sample sent before this message."""

    node_id: NodeId
    public_keys: Annotated[tuple[str, ...], fields.distinct_keys, _some]
    timestamp: Integer


@dataclass(frozen=True)
class PeerCounters(Message):
    """Cumulative WireGuard counters of one peer. `epoch` changes whenever the counters restart
    from zero (peer re-added or re-keyed, interface recreated), so a reset is never mistaken
    for traffic."""

    public_key: WireGuardKey
    epoch: Integer
    rx_bytes: Integer
    tx_bytes: Integer


@dataclass(frozen=True)
class MeteringSample(Message):
    """Body of a METERING message, signed by the node identity so a bill can be proved.
    (`boot_id`, `seq`) names the sample: a resent sample is stored once."""

    node_id: NodeId
    boot_id: Annotated[str, _NONCE]
    seq: Integer
    sampled_at: Integer
    peers: Annotated[tuple[PeerCounters, ...], items(PeerCounters, MAX_PEERS)]
