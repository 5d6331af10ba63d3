"""The gateway's WireGuard hub: endpoint discovery for nodes behind NAT (docs/nat.md, step 1).

The hub is a WireGuard interface (address 10.100.0.1, ipplan.GATEWAY_HUB_ADDRESS; port
MOLT_HUB_PORT) run by its own process (``manage.py run_hub``). Its key is the X25519 conversion
of the gateway's Ed25519 key, so agents that pinned the gateway key at enrolment know it
already. Every enrolled, non-revoked node is a peer of the hub, and every node's signed desired
state carries the hub as a peer with persistent keepalive
(``hub_peer``). WireGuard sets a peer's endpoint from the source of its latest authenticated
packet, so the hub's view of a node's endpoint is the public mapping of the node's own WireGuard
socket, as every NAT on the way translated it: what a buyer must send to. The hub process reads
those endpoints every MOLT_HUB_POLL_SECONDS and stores each node's in ``Node.observed_endpoint``.

The hub sends nothing on its own (no keepalive on its side): the nodes keep their mappings
open. It carries no traffic: its peers have **no allowed IPs**, so WireGuard drops every packet
a node sends into the tunnel (cryptokey routing) and routes nothing to one, while handshakes and
keepalives, which need no allowed IP, still set each peer's endpoint. Whatever the gateway host
listens on or forwards, a node cannot reach it through the hub.

Pure helpers (``plan_peers``, ``observed_endpoints``) and the database side (``wanted_peers``,
``record_endpoints``) are here; the loop and the WireGuard backend are in the command.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from datetime import datetime

from clawnode import reconcile, wire
from clawnode.backends.base import PeerStatus, WireGuardBackend
from clawnode.keys import Identity, encode_key, wireguard_public_key
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from meshnet import signals
from meshnet.gateway_key import gateway_identity
from meshnet.ipplan import GATEWAY_HUB_ADDRESS
from meshnet.mesh import bump_peers_of
from meshnet.models import JobPeer, Node
from meshnet.wgconfig import WgPeer

log = logging.getLogger(__name__)

HUB_REF = "hub"  # the hub peer's ref in a desired state (kind "mesh")
HUB_ADDRESS = f"{GATEWAY_HUB_ADDRESS}/32"


def hub_configured() -> bool:
    return bool(settings.MOLT_HUB_ENDPOINT)


def check_hub_settings() -> None:
    """Stop the gateway at start-up on a hub endpoint nodes could not use (MeshnetConfig.ready),
    rather than signing desired states every agent would refuse."""
    if not hub_configured():
        return
    try:
        wire.parse_endpoint(settings.MOLT_HUB_ENDPOINT)
    except ValueError as exc:
        raise ImproperlyConfigured(f"MOLT_HUB_ENDPOINT: {exc}") from None
    if not 1 <= settings.MOLT_HUB_KEEPALIVE_SECONDS <= 65535:
        raise ImproperlyConfigured("MOLT_HUB_KEEPALIVE_SECONDS must be 1-65535")


def hub_private_key() -> bytes:
    return gateway_identity().wireguard_private_key


def hub_public_key() -> str:
    return _wireguard_public_key_b64(gateway_identity())


@functools.lru_cache(maxsize=8)
def _wireguard_public_key_b64(identity: Identity) -> str:
    """The X25519 public key of the gateway key `identity`, derived once per key (a rotation
    brings a new identity, gateway_key.gateway_identity): every ack asks for it
    (agent_channel.check_ack) and every desired state names it, and the scalar multiplication
    each time was 3% of the web process during a change to 2,000 nodes (py-spy)."""
    return encode_key(wireguard_public_key(identity.wireguard_private_key))


def hub_peer() -> wire.PeerSpec | None:
    """The hub as a peer of a node's interface, None while no hub is configured.

    Kind "mesh" (not a kind of its own): an agent that predates the hub applies it as any other
    peer, where a new kind would make it refuse the whole state."""
    if not hub_configured():
        return None
    return wire.PeerSpec(
        public_key=hub_public_key(),
        allowed_ips=(HUB_ADDRESS,),
        kind="mesh",
        ref=HUB_REF,
        endpoint=settings.MOLT_HUB_ENDPOINT,
        persistent_keepalive=settings.MOLT_HUB_KEEPALIVE_SECONDS,
    )


def buyer_hub_peer() -> WgPeer | None:
    """The hub as the second peer of a buyer's wg-quick file (meshnet.wgconfig), None while no
    hub is configured: allowed 10.100.0.1/32 only (the hub itself; it routes nothing back),
    endpoint MOLT_HUB_ENDPOINT and keepalive 25 s, so the hub sees the buyer's public mapping
    and keeps it fresh."""
    if not hub_configured():
        return None
    return WgPeer(
        public_key=hub_public_key(),
        allowed_ips=(HUB_ADDRESS,),
        endpoint=settings.MOLT_HUB_ENDPOINT,
        persistent_keepalive=25,
    )


# -- the hub's own key ----------------------------------------------------------------------------


def bring_up(backend: WireGuardBackend) -> str:
    """Create (or adopt) the hub interface with the gateway key's X25519 conversion, its port
    and address; the hub's public key it now has. Peers and their endpoints are left alone."""
    identity = gateway_identity()  # one read: the key set and the key returned are the same
    backend.ensure_interface(
        settings.MOLT_HUB_INTERFACE,
        identity.wireguard_private_key,
        settings.MOLT_HUB_PORT,
        HUB_ADDRESS,
    )
    return identity.wireguard_public_key_b64


def follow_gateway_key(backend: WireGuardBackend, applied: str) -> str:
    """After a rotation (manage.py rotate_gateway_key) set the interface's private key to the
    new gateway key's, in place: peers and the endpoints they roamed to stay, and the nodes,
    pushed the new hub key in their desired state, handshake with it. ``applied`` is the hub
    public key the interface was last given; returns the one it has now. gateway_identity
    reads gateway.key again only when the file changed, so calling this every reconcile costs
    a stat."""
    if hub_public_key() == applied:
        return applied
    now = bring_up(backend)
    log.info("hub key follows the rotated gateway key: %s (was %s), peers kept", now, applied)
    return now


# -- the hub's peers ------------------------------------------------------------------------------


NO_ALLOWED_IPS: tuple[str, ...] = ()


def wanted_peers() -> dict[str, tuple[str, ...]]:
    """{WireGuard public key: allowed IPs} of every peer the hub should have: each enrolled,
    non-revoked node, and each job peer its node should have (its buyer's current key: the
    buyer's wg-quick file carries the hub as a second peer, meshnet.wgconfig), all with no
    allowed IP (the hub carries no traffic; see above). A buyer's key is never a node's
    (meshnet.peers.validate_peer_key); it is live on one peer, or on one peer per node of a
    multi-node order (meshnet.key_claims), one hub peer either way."""
    wanted = {
        key: NO_ALLOWED_IPS
        for key in Node.objects.filter(revoked_at__isnull=True).values_list(
            "wireguard_public_key", flat=True
        )
    }
    for key in (
        JobPeer.objects.in_desired_state()
        .filter(node__revoked_at__isnull=True)
        .values_list("public_key", flat=True)
    ):
        wanted.setdefault(key, NO_ALLOWED_IPS)
    return wanted


def plan_peers(
    wanted: Mapping[str, tuple[str, ...]], actual: Mapping[str, PeerStatus]
) -> list[reconcile.Action]:
    """The per-peer changes that make the hub's peers ``wanted`` (pure). A peer no longer wanted
    (a revoked node) is removed at once: the hub meters nothing, so unlike an agent it has no
    final counters to wait for. The hub side keeps no keepalive and sets no endpoint (it learns
    each from the node's packets)."""
    actions: list[reconcile.Action] = [
        reconcile.Remove(key) for key in sorted(actual.keys() - wanted.keys())
    ]
    for key in sorted(wanted):
        allowed = wanted[key]
        status = actual.get(key)
        if status is None:
            actions.append(reconcile.Add(key, allowed))
        elif set(status.allowed_ips) != set(allowed) or status.persistent_keepalive:
            actions.append(reconcile.Update(key, allowed, changed=("allowed_ips",)))
    return actions


def reconcile_peers(backend: WireGuardBackend) -> dict[str, str]:
    """Bring the hub's peers to the database's nodes; {public key: "ok" or "error: ..."} of the
    peers changed."""
    actions = plan_peers(wanted_peers(), backend.list_peers())
    return reconcile.apply(backend, actions)


# -- discovery ------------------------------------------------------------------------------------


def observed_endpoints(actual: Mapping[str, PeerStatus]) -> dict[str, str]:
    """{public key: endpoint} of the peers that have completed a handshake with the hub (pure).
    WireGuard takes a peer's endpoint only from authenticated packets, so these are mappings
    the nodes themselves sent from, never an address someone spoofed."""
    return {
        key: status.endpoint
        for key, status in actual.items()
        if status.endpoint and status.last_handshake
    }


def record_endpoints(observed: Mapping[str, str], at: datetime | None = None) -> list[str]:
    """Store each node's mapping where it changed; the node ids whose mapping changed. One
    transaction; a row is written only when its mapping differs (the hub reads every second,
    a mapping changes when a router reboots). A node that declares no endpoint has its
    node-to-node peers on other nodes follow its new one (meshnet.mesh.bump_peers_of)."""
    if not observed:
        return []
    at = at or timezone.now()
    changed: list[str] = []
    with transaction.atomic():
        nodes = (
            Node.objects.filter(wireguard_public_key__in=list(observed), revoked_at__isnull=True)
            .order_by("id")
            .values_list(
                "pk", "node_id", "wireguard_public_key", "observed_endpoint", "declared_endpoint"
            )
        )
        for pk, node_id, key, current, declared in nodes:
            endpoint = observed[key]
            if endpoint == current:
                continue
            Node.objects.filter(pk=pk).update(observed_endpoint=endpoint, observed_endpoint_at=at)
            changed.append(node_id)
            if not declared:
                # The node's peers on the other nodes of its multi-node orders send here now
                bump_peers_of(pk)
            log.info(
                "node %s: hub observed endpoint %s (was %s)", node_id, endpoint, current or "-"
            )
    return changed


def record_buyer_endpoints(observed: Mapping[str, str], at: datetime | None = None) -> list[str]:
    """Store each live job peer's buyer mapping where it changed; the refs whose mapping
    changed. One transaction. A changed mapping changes the node's desired state (the job
    peer's endpoint, meshnet.desired_state): the node's revision is bumped and the signed state
    pushed after commit (meshnet.peers' path), so the provider sends toward the buyer's new
    mapping while the buyer sends toward the provider: coordinated punching (docs/nat.md).
    Lock order as everywhere in meshnet: node rows first."""
    if not observed:
        return []
    at = at or timezone.now()
    changed: list[str] = []
    with transaction.atomic():
        candidates = list(
            JobPeer.objects.in_desired_state()
            .filter(public_key__in=list(observed), node__revoked_at__isnull=True)
            .order_by("pk")
            .values_list("pk", "node_id", "ref", "public_key", "observed_endpoint")
        )
        stale = [row for row in candidates if observed[row[3]] != row[4]]
        if not stale:
            return []
        node_pks = sorted({row[1] for row in stale})
        list(Node.objects.select_for_update().filter(pk__in=node_pks).order_by("pk"))
        moved: set[int] = set()
        for pk, node_pk, ref, key, current in stale:
            endpoint = observed[key]
            # Under the node's lock: a re-key or removal may have won the race since the read.
            updated = (
                JobPeer.objects.in_desired_state()
                .filter(pk=pk, public_key=key)
                .exclude(observed_endpoint=endpoint)
                .update(observed_endpoint=endpoint, observed_endpoint_at=at)
            )
            if not updated:
                continue
            moved.add(node_pk)
            changed.append(ref)
            log.info(
                "job peer %s: hub observed buyer endpoint %s (was %s)",
                ref,
                endpoint,
                current or "-",
            )
        for node_pk in sorted(moved):
            # meshnet.peers bumps and pushes (it imports this module, so not called directly).
            signals.desired_state_changed.send(sender=JobPeer, node_pk=node_pk)
    return changed


def discover(backend: WireGuardBackend, at: datetime | None = None) -> list[str]:
    """Read the hub's peers once and store what they show; the node ids, then the job peer refs,
    whose mapping changed."""
    observed = observed_endpoints(backend.list_peers())
    return record_endpoints(observed, at) + record_buyer_endpoints(observed, at)
