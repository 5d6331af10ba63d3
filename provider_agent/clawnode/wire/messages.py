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
    "PATH_STATES",
    "PEER_KINDS",
    "SANDBOX_STATES",
    "Ack",
    "AgentAuth",
    "Connectivity",
    "DesiredState",
    "EnrollRequest",
    "GpuInfo",
    "MeteringSample",
    "PeerCounters",
    "PeerResult",
    "PeerSpec",
    "Refusal",
    "Removed",
    "RoundTrip",
    "RoundTrips",
    "SandboxReport",
    "SandboxSpec",
    "SandboxStatus",
]

PEER_KINDS = ("job", "mesh")
# What a connectivity check found of one path (Connectivity): a handshake completed, none did
# in time, nothing to test (no hub configured; no peer node to try: node-to-node peers exist
# only while a multi-node job runs, docs/network.md, and the check does not use them yet).
PATH_STATES = ("reachable", "unreachable", "untested")
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
    # The region the provider declares (`clawnode join --region`): the gateway checks it against
    # its IP plan and leases the node's address in that region's block. Optional, so requests
    # of agents that predate it still parse; the agent leaves it out of the body when empty, so
    # a gateway that predates it still takes the request of a node that declares none.
    region: Annotated[str, fields.text(16, empty=True)] = ""

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


SANDBOX_STATES = ("pulling", "starting", "ready", "stopped", "failed")
MAX_SANDBOXES = 256
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")  # a registry image reference
# One authorized_keys line: a key type, base64, an optional comment; never options
# (command=, from=...): the gateway checks keys the way ssh-keygen -l would before they get here.
_SSH_KEY_RE = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)"
    r"|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,3}( [\x20-\x7e]{0,200})?"
)
_ADDRESS = fields.networks(1)


def _one_address(value: object, name: str) -> str:
    """A single IPv4 host as a /32 CIDR string, e.g. "10.128.0.33/32"."""
    if isinstance(value, (list, tuple)):
        raise ProtocolError(f"{name} must be one IPv4 address as a /32", name)
    (net,) = _ADDRESS([value], name)
    if not (isinstance(net, str) and net.endswith("/32")) or ":" in net:
        raise ProtocolError(f"{name} must be one IPv4 address as a /32", name)
    return net


MAX_MESH_MATES = 256
_MATES = fields.networks(MAX_MESH_MATES)


def _mesh_mates(value: object, name: str) -> tuple[str, ...]:
    """Distinct single IPv4 addresses as /32s, possibly none."""
    if isinstance(value, (list, tuple)) and not value:
        return ()
    mates: tuple[str, ...] = _MATES(value, name)
    for i, net in enumerate(mates):
        if not net.endswith("/32") or ":" in net:
            raise ProtocolError(f"{name}[{i}] must be one IPv4 address as a /32", f"{name}[{i}]")
    return mates


@dataclass(frozen=True)
class SandboxSpec(Message):
    """One job's sandbox a node should run: a container with exactly these GPUs, these limits,
    its own network namespace on `address`, reachable from the job peer `peer_address` only,
    with sshd taking the buyer's `ssh_keys`. Named by `ref`, the same ref as the job's peer
    ("order:N"). Signed with the rest of the desired state, so nothing unsigned picks an image,
    a GPU or a key."""

    ref: Annotated[str, fields.text(128)]
    image: Annotated[str, fields.pattern(_IMAGE_RE, 255, "an image reference")]
    address: Annotated[str, _one_address]  # the sandbox's own address, "10.128.0.33/32"
    peer_address: Annotated[str, _one_address]  # the buyer's tunnel address, the only source
    gpus: Annotated[tuple[int, ...], fields.integers(0, 1023, 64)]  # GPU indexes on the node
    cpus: Annotated[int, fields.integer(1, 1024 * 1000)]  # millicores
    memory_mb: Annotated[int, fields.integer(16, 2**31 - 1)]
    disk_gb: Annotated[int, fields.integer(1, 2**20)]
    pids_limit: Annotated[int, fields.integer(16, 2**22)]
    egress: Annotated[bool, fields.boolean]  # may reach the internet through NAT
    ssh_keys: Annotated[
        tuple[str, ...], fields.texts(_SSH_KEY_RE, 16384, 20, "an OpenSSH public key line")
    ]
    # The job's private network (a multi-node order, docs/network.md): the addresses of the
    # other sandboxes of the same order, each a /32, that this one may reach and be reached from
    # (over a node-to-node "mesh" peer when on another node). Empty for a single-node job, and
    # then left out of the JSON, so an agent that predates it still takes the state.
    mesh: Annotated[tuple[str, ...], _mesh_mates] = ()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.mesh:
            del out["mesh"]
        return out


@dataclass(frozen=True)
class DesiredState(Message):
    """Body of a DESIRED_STATE message: the full peer set of one node, signed by the gateway.

    Level-triggered: the agent keeps the highest revision it has applied and ignores lower ones.
    """

    node_id: NodeId
    revision: Integer
    peers: Annotated[tuple[PeerSpec, ...], items(PeerSpec, MAX_PEERS), _one_owner]
    issued_at: Integer  # Unix seconds
    # The job sandboxes the node should run; each one's ref is also a job peer's ref. Default
    # empty, so a state from a gateway that predates sandboxes still parses the same.
    sandboxes: Annotated[
        tuple[SandboxSpec, ...], items(SandboxSpec, MAX_SANDBOXES), _one_sandbox_each
    ] = ()

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


def _one_sandbox_each(sandboxes: tuple[SandboxSpec, ...], name: str) -> tuple[SandboxSpec, ...]:
    """A ref, an address and a GPU belong to one sandbox only."""
    refs: set[str] = set()
    addresses: set[str] = set()
    gpus: set[int] = set()
    for i, box in enumerate(sandboxes):
        if box.ref in refs:
            raise ProtocolError(
                f"{name}[{i}].ref {box.ref} names two sandboxes", f"{name}[{i}].ref"
            )
        if box.address in addresses:
            raise ProtocolError(
                f"{name}[{i}].address {box.address} is another sandbox's", f"{name}[{i}].address"
            )
        taken = gpus.intersection(box.gpus)
        if taken or len(set(box.gpus)) != len(box.gpus):
            raise ProtocolError(
                f"{name}[{i}].gpus gives a GPU to two sandboxes", f"{name}[{i}].gpus"
            )
        refs.add(box.ref)
        addresses.add(box.address)
        gpus.update(box.gpus)
    return sandboxes


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
class Refusal(Message):
    """Body of a REFUSAL message, signed by the gateway: it refuses this node (revoked, or not
    known), said on the connection whose `challenge` it names, so a recorded one is worthless on
    any other. An agent stops for good only on this: a bare close code 4403, which anyone on the
    path can send, only makes it reconnect later."""

    node_id: NodeId
    challenge: Annotated[str, fields.pattern(_CHALLENGE_RE, 43, "43 URL-safe base64 characters")]
    reason: Annotated[str, fields.text(200, empty=True)]
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


@dataclass(frozen=True)
class SandboxReport(Message):
    """Where one sandbox stands, as the agent sees it. `gpus`: what the container really got
    (index, model, UUID each); `host_keys`: the sshd host public keys made fresh for this job
    ("ssh-ed25519 AAAA..."), so the buyer's first connect is verified; `ports`: TCP ports the
    image exposes besides ssh (e.g. 8888 for Jupyter); `progress`: 0-100 while pulling."""

    ref: Annotated[str, fields.text(128)]
    state: Annotated[
        Literal["pulling", "starting", "ready", "stopped", "failed"], fields.choice(*SANDBOX_STATES)
    ]
    detail: Annotated[str, fields.text(500, empty=True)] = ""
    progress: Annotated[int, fields.integer(0, 100)] = 0
    gpus: Annotated[tuple[GpuInfo, ...], items(GpuInfo, 64)] = ()
    host_keys: Annotated[
        tuple[str, ...], fields.texts(_SSH_KEY_RE, 16384, 8, "an OpenSSH public key line")
    ] = ()
    ports: Annotated[tuple[int, ...], fields.integers(1, 65535, 32)] = ()


@dataclass(frozen=True)
class SandboxStatus(Message):
    """Body of a SANDBOX_STATUS message, signed by the node: the sandboxes that changed since the
    last one (`full` false) or every sandbox the node has (`full` true: sent after each
    (re)connect and after applying a desired state, so a lost message is repaired by the next)."""

    node_id: NodeId
    sandboxes: Annotated[tuple[SandboxReport, ...], items(SandboxReport, MAX_SANDBOXES)]
    timestamp: Integer
    full: Annotated[bool, fields.boolean] = False


@dataclass(frozen=True)
class Connectivity(Message):
    """Body of a CONNECTIVITY message, signed by the node: what its latest check of the mesh
    found (clawnode.connectivity), after joining and every few minutes.

    ``hub``: whether a WireGuard handshake with the gateway's hub completed within the check's
    deadline, ``hub_rtt_ms`` how long it took (from the hub peer being set on the interface to
    the handshake, which is one round trip plus two Noise operations; 0 when not reachable).
    ``peer`` the same for a peer node (``peer_node_id``); "untested" while the gateway names
    none. ``detail`` says why a path is unreachable or untested. The gateway keeps the newest
    by ``checked_at`` (a replayed older one changes nothing)."""

    node_id: NodeId
    checked_at: Integer  # Unix seconds
    hub: Annotated[str, fields.choice(*PATH_STATES)]
    hub_rtt_ms: Annotated[int, fields.integer(0, 600_000)] = 0
    peer: Annotated[str, fields.choice(*PATH_STATES)] = "untested"
    peer_node_id: Annotated[str, fields.text(64, empty=True)] = ""
    peer_rtt_ms: Annotated[int, fields.integer(0, 600_000)] = 0
    detail: Annotated[str, fields.text(300, empty=True)] = ""


# The longest round trip a ping waits for (clawnode.rtt.TIMEOUT is shorter): 10 s in µs.
MAX_RTT_US = 10_000_000


@dataclass(frozen=True)
class RoundTrip(Message):
    """One job peer's ping (clawnode.rtt): ``answered`` and its round trip in microseconds
    (integers only on the wire: a float is refused by canonical_bytes; a LAN's 0.3 ms would
    read 0 in whole milliseconds), or not answered within the agent's timeout (``rtt_us`` 0).
    The peer is named by its key and its ref (the order), as the desired state named it."""

    public_key: WireGuardKey
    ref: Annotated[str, fields.text(128)]
    answered: Annotated[bool, fields.boolean]
    rtt_us: Annotated[int, fields.integer(0, MAX_RTT_US)] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.answered and self.rtt_us == 0:
            raise ProtocolError("an answered ping needs its round trip (rtt_us > 0)", "rtt_us")
        if not self.answered and self.rtt_us != 0:
            raise ProtocolError("a ping with no answer has no round trip (rtt_us 0)", "rtt_us")


@dataclass(frozen=True)
class RoundTrips(Message):
    """Body of a ROUND_TRIPS message, signed by the node: one round of pings from its mesh
    address to its live job peers' tunnel addresses (clawnode.rtt), about once a minute, sent
    only to a gateway whose welcome names "round_trips" in ``accepts``. The gateway keeps, per
    peer, the newest by ``measured_at``."""

    node_id: NodeId
    measured_at: Integer  # Unix seconds
    peers: Annotated[tuple[RoundTrip, ...], items(RoundTrip, MAX_PEERS)]
