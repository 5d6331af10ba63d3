"""Every write path of the mesh, one transaction each.

Lock order, everywhere: node row, then pool row. Allocation holds the pool row lock only for
the insert of one lease.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from clawnode import wire
from clawnode.keys import (
    InvalidKey,
    encode_key,
    node_id_for,
    parse_wireguard_public_key,
    x25519_public_from_ed25519,
)
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from meshnet import ipplan, metering
from meshnet.errors import EnrollmentRefused, InvalidPeerKey, PeerKeyInUse, PoolExhausted
from meshnet.gateway_key import gateway_identity
from meshnet.models import (
    EnrollmentToken,
    Gpu,
    IpAllocation,
    IpPool,
    JobPeer,
    JobPeerKey,
    MeteringSample,
    Node,
    NodeOutage,
    UsedNonce,
)
from meshnet.signals import node_revoked, peer_acknowledged, peer_removed, peer_traffic

log = logging.getLogger(__name__)

ENROLLMENT_TOKEN_PREFIX = "molt_enr_"  # noqa: S105  (a prefix, not a secret)


# --- addresses ---------------------------------------------------------------------------


def _locked_pool(pool_name: str) -> IpPool:
    """The pool row, locked for this transaction (PostgreSQL; SQLite's IMMEDIATE transactions
    already serialize writers). Pools are created on first use from the IP plan."""
    try:
        return IpPool.objects.select_for_update().get(name=pool_name)
    except IpPool.DoesNotExist:
        cidr = ipplan.block(pool_name).cidr
        IpPool.objects.get_or_create(name=pool_name, defaults={"cidr": cidr})
        return IpPool.objects.select_for_update().get(name=pool_name)


def allocate_address(pool_name: str, purpose: str) -> IpAllocation:
    """Lease one address of `pool_name`.

    Locks: the pool row. Fresh offsets are taken in order (O(1)); once the pool's end is
    reached, the released lease with the oldest expired quarantine is reused (one index range
    read). Raises PoolExhausted (409) when neither exists. The unique (pool, address)
    constraint backs the lock: a bug here fails loudly instead of handing out an address twice.
    """
    with transaction.atomic():
        pool = _locked_pool(pool_name)
        network = pool.network
        if pool.next_offset <= ipplan.last_offset(network):
            address = ipplan.address_at(network, pool.next_offset)
            lease = IpAllocation.objects.create(pool=pool, address=str(address), purpose=purpose)
            IpPool.objects.filter(pk=pool.pk).update(next_offset=F("next_offset") + 1)
            return lease
        now = timezone.now()
        lease = (
            IpAllocation.objects.select_for_update()
            .filter(pool=pool, reusable_after__lte=now)
            .order_by("reusable_after", "id")
            .first()
        )
        if lease is None:
            raise PoolExhausted(pool.name)
        lease.released_at = None
        lease.reusable_after = None
        lease.allocated_at = now
        lease.purpose = purpose
        lease.save(update_fields=["released_at", "reusable_after", "allocated_at", "purpose"])
        return lease


def release_address(lease: IpAllocation) -> None:
    """Return a lease to its pool after the quarantine period. Releasing twice is a no-op."""
    now = timezone.now()
    quarantine = timedelta(seconds=settings.MOLT_ADDRESS_QUARANTINE_SECONDS)
    IpAllocation.objects.filter(pk=lease.pk, released_at__isnull=True).update(
        released_at=now, reusable_after=now + quarantine
    )


# --- enrolment -----------------------------------------------------------------------------


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once; only its hash is stored
    record: EnrollmentToken


def create_enrollment_token(owner) -> IssuedToken:
    """A one-time enrolment token for `owner`, valid MOLT_ENROLLMENT_TOKEN_TTL_SECONDS."""
    token = ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = timezone.now()
    record = EnrollmentToken.objects.create(
        owner=owner,
        token_hash=_hash_token(token),
        hint=token[: len(ENROLLMENT_TOKEN_PREFIX) + 4],
        created_at=now,
        expires_at=now + timedelta(seconds=settings.MOLT_ENROLLMENT_TOKEN_TTL_SECONDS),
    )
    return IssuedToken(token=token, record=record)


def _remember_nonce(kind: str, nonce: str) -> None:
    """Refuse a second use of a nonce; the unique constraint decides races."""
    try:
        with transaction.atomic():
            UsedNonce.objects.create(kind=kind, nonce=nonce)
    except IntegrityError:
        raise EnrollmentRefused("replayed request: this nonce was already used") from None


def _replace_gpus(node: Node, gpus: tuple[wire.GpuInfo, ...]) -> None:
    if any(gpu.simulated for gpu in gpus) and not settings.MOLT_ALLOW_SIMULATED_GPUS:
        raise EnrollmentRefused("simulated GPUs are not accepted by this gateway")
    node.gpus.all().delete()
    Gpu.objects.bulk_create(
        Gpu(
            node=node,
            index=gpu.index,
            name=gpu.name,
            memory_mb=gpu.memory_mb,
            uuid=gpu.uuid,
            driver_version=gpu.driver_version,
            cuda_version=gpu.cuda_version,
            simulated=gpu.simulated,
        )
        for gpu in gpus
    )


@dataclass(frozen=True)
class Enrolment:
    node: Node
    created: bool


def enroll_node(envelope: Mapping[str, Any], *, observed_ip: str | None) -> Enrolment:
    """Register a node from a signed enrolment request (proof of possession of its identity).

    Checks, in order: well-formed body, signature by the identity key in the body, timestamp
    within MOLT_ENROLLMENT_MAX_SKEW_SECONDS, WireGuard key equal to the identity's X25519
    conversion, nonce never seen (replay), token valid, unused and unexpired. A retry of the same
    identity with the token it already used returns the same node (a lost response is safe to
    retry). One transaction: token consumed, mesh address leased, node and GPUs written.
    """
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    if not isinstance(body, Mapping):
        raise EnrollmentRefused("request must be a signed envelope with a 'body' object")
    try:
        request = wire.EnrollRequest.from_dict(body)
    except (wire.ProtocolError, InvalidKey) as exc:
        err = EnrollmentRefused(f"invalid enrolment request: {exc}")
        err.status_code = 400
        raise err from None
    identity_key = base64.b64decode(request.identity_public_key)
    try:
        wire.open_envelope(envelope, identity_key, wire.ENROLL)
    except (wire.BadSignature, wire.ProtocolError) as exc:
        raise EnrollmentRefused(f"signature refused: {exc}") from None
    try:
        wire.check_fresh(
            request.timestamp,
            int(timezone.now().timestamp()),
            max_skew=settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS,
        )
    except wire.StaleMessage as exc:
        raise EnrollmentRefused(f"stale request: {exc}") from None
    if encode_key(x25519_public_from_ed25519(identity_key)) != request.wireguard_public_key:
        raise EnrollmentRefused(
            "wireguard_public_key is not the X25519 conversion of the identity key"
        )

    with transaction.atomic():
        _remember_nonce(wire.ENROLL, request.nonce)
        token = (
            EnrollmentToken.objects.select_for_update(of=("self",))
            .filter(token_hash=_hash_token(request.token))
            .select_related("node")
            .first()
        )
        if token is None:
            raise EnrollmentRefused("unknown enrolment token")
        if token.used_at is not None:
            if (
                token.node is not None
                and token.node.identity_public_key == request.identity_public_key
            ):
                return Enrolment(node=token.node, created=False)
            raise EnrollmentRefused("enrolment token was already used")
        if token.expires_at <= timezone.now():
            raise EnrollmentRefused("enrolment token has expired; create a new one")
        existing = Node.objects.filter(identity_public_key=request.identity_public_key).first()
        if existing is not None:
            if existing.owner_id != token.owner_id or existing.revoked_at is not None:
                raise EnrollmentRefused("this identity is enrolled to another account or revoked")
            EnrollmentToken.objects.filter(pk=token.pk).update(used_at=timezone.now())
            return Enrolment(node=existing, created=False)

        lease = allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.NODE)
        node = Node.objects.create(
            owner_id=token.owner_id,
            node_id=node_id_for(identity_key),
            name=f"pending-{secrets.token_hex(6)}",
            identity_public_key=request.identity_public_key,
            wireguard_public_key=request.wireguard_public_key,
            mesh_address=lease.address,
            allocation=lease,
            hostname=request.hostname,
            listen_port=request.listen_port,
            declared_endpoint=request.endpoint,
            observed_ip=observed_ip,
        )
        # The name comes from the primary key, which exists only after the insert.
        node.name = f"node-{node.pk}"
        node.save(update_fields=["name"])
        _replace_gpus(node, request.gpus)
        token.used_at = timezone.now()
        token.node = node
        token.save(update_fields=["used_at", "node"])
        notify_owner(node, "enrolled")
    log.info("node %s enrolled at %s for user %s", node.name, node.mesh_address, node.owner_id)
    return Enrolment(node=node, created=True)


def websocket_url(base_url: str) -> str:
    """ws(s)://host/ws/agent/ for a gateway reached at base_url (http or https)."""
    if base_url.startswith("https://"):
        return "wss://" + base_url.removeprefix("https://").rstrip("/") + "/ws/agent/"
    return "ws://" + base_url.removeprefix("http://").rstrip("/") + "/ws/agent/"


# --- job peers and desired state ----------------------------------------------------------


def validate_peer_key(public_key: str) -> str:
    try:
        parse_wireguard_public_key(public_key)
    except InvalidKey as exc:
        raise InvalidPeerKey(f"wireguard_public_key {exc}") from None
    return public_key


def _bump_revision(node_pk: int) -> None:
    Node.objects.filter(pk=node_pk).update(desired_revision=F("desired_revision") + 1)


def _push_on_commit(node_pk: int) -> None:
    from meshnet.tasks import push_desired_state

    transaction.on_commit(lambda: push_desired_state.delay(node_pk))


def create_job_peer(node: Node, public_key: str, ref: str) -> JobPeer:
    """Add a buyer's peer to `node` with a fresh job address from the MOLT pool.

    Idempotent on `ref` (a retried task returns the same peer). Locks: node row, then pool row.
    Bumps the node's desired revision and pushes the signed state after commit. The key becomes
    the peer's first JobPeerKey. Raises InvalidPeerKey, PeerKeyInUse (the key is live on another
    peer, or retired from one whose node has not yet acknowledged its removal), PoolExhausted.
    """
    validate_peer_key(public_key)
    with transaction.atomic():
        locked = Node.objects.select_for_update().get(pk=node.pk)
        existing = JobPeer.objects.filter(ref=ref).first()
        if existing is not None:
            return existing
        if _key_in_use(public_key):
            raise PeerKeyInUse(KEY_IN_USE)
        lease = allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
        _bump_revision(locked.pk)
        locked.refresh_from_db(fields=["desired_revision"])
        try:
            with transaction.atomic():
                peer = JobPeer.objects.create(
                    node=locked,
                    public_key=public_key,
                    address=lease.address,
                    allocation=lease,
                    ref=ref,
                    added_revision=locked.desired_revision,
                )
                JobPeerKey.objects.create(
                    job_peer=peer,
                    public_key=public_key,
                    active_from=peer.created_at,
                    added_revision=peer.added_revision,
                )
        except IntegrityError:
            raise PeerKeyInUse(KEY_IN_USE) from None
        _push_on_commit(locked.pk)
        return peer


KEY_IN_USE = "this WireGuard public key is already in use on another peer"


def _key_in_use(public_key: str, *, peer: JobPeer | None = None) -> bool:
    """Whether `public_key` is open on a peer other than `peer`: live there, or retired from it
    with its final counters still to come (see JobPeerKey). The unique constraints decide races;
    this check only gives the usual case a clear error before any write."""
    open_keys = JobPeerKey.objects.filter(public_key=public_key, closed_at__isnull=True)
    live = JobPeer.objects.live().filter(public_key=public_key)
    if peer is not None:
        open_keys = open_keys.exclude(job_peer=peer)
        live = live.exclude(pk=peer.pk)
    return open_keys.exists() or live.exists()


def remove_job_peer(ref: str) -> JobPeer | None:
    """Drop the peer named `ref` from its node's desired state (removal completes when the agent
    acknowledges). Idempotent: a peer already removing or removed is left alone."""
    with transaction.atomic():
        peer = JobPeer.objects.filter(ref=ref).first()
        if peer is None:
            return None
        Node.objects.select_for_update().get(pk=peer.node_id)
        peer.refresh_from_db()
        if peer.state in (JobPeer.State.REMOVING, JobPeer.State.REMOVED):
            return peer
        _bump_revision(peer.node_id)
        revision = Node.objects.values_list("desired_revision", flat=True).get(pk=peer.node_id)
        JobPeer.objects.filter(pk=peer.pk).update(
            state=JobPeer.State.REMOVING, removed_revision=revision
        )
        _push_on_commit(peer.node_id)
        peer.refresh_from_db()
        return peer


def desired_state(node: Node) -> wire.DesiredState:
    """The full set of peers `node` should have at its current desired revision."""
    peers = tuple(
        wire.PeerSpec(
            public_key=peer.public_key,
            allowed_ips=(f"{peer.address}/32",),
            kind="job",
            ref=peer.ref,
        )
        for peer in JobPeer.objects.filter(node=node).in_desired_state().order_by("id")
    )
    return wire.DesiredState(
        node_id=node.node_id,
        revision=node.desired_revision,
        peers=peers,
        issued_at=int(timezone.now().timestamp()),
    )


def signed_desired_state(node: Node) -> dict[str, Any]:
    return wire.signed_envelope(
        wire.DESIRED_STATE, desired_state(node).to_dict(), gateway_identity()
    )


def acknowledge_revision(
    node: Node,
    revision: int,
    failed_keys: frozenset[str] = frozenset(),
    at: datetime | None = None,
    removing_keys: frozenset[str] = frozenset(),
) -> None:
    """Record that `node`'s agent applied desired state `revision`.

    Peers added at or before `revision` (and not in `failed_keys`) become active and fire
    peer_acknowledged; peers removed at or before it are gone (see _record_gone). Keys in
    `failed_keys` stay as they are. Keys in `removing_keys` are still on the interface, cut
    off, their final counters not yet read: they stay open until a REMOVED message names them
    (record_removed). A stale or repeated ack changes nothing else. Locks: node row, then the
    keys it closes.
    """
    at = at or timezone.now()
    with transaction.atomic():
        locked = Node.objects.select_for_update().get(pk=node.pk)
        if revision > locked.desired_revision:
            raise ValueError(
                f"acknowledged revision {revision} is ahead of "
                f"desired revision {locked.desired_revision}"
            )
        # A revision with failed peers is not fully applied: leaving acked_revision behind makes
        # the reconciler push it again, and the agent retries the failed peers. Peers still
        # leaving are applied (cut off); their removal follows without another push.
        if revision > locked.acked_revision and not failed_keys:
            Node.objects.filter(pk=locked.pk).update(acked_revision=revision)
        _record_gone(
            locked,
            Q(retired_revision__lte=revision),
            Q(removed_revision__lte=revision),
            at,
            exclude=failed_keys | removing_keys,
        )
        added = JobPeer.objects.filter(
            node=locked, state=JobPeer.State.DESIRED, added_revision__lte=revision
        ).exclude(public_key__in=failed_keys)
        for peer in added:
            if JobPeer.objects.filter(pk=peer.pk, state=JobPeer.State.DESIRED).update(
                state=JobPeer.State.ACTIVE, acked_at=at
            ):
                peer.refresh_from_db()
                peer_acknowledged.send(sender=JobPeer, job_peer=peer, at=at)


def record_removed(node: Node, public_keys: frozenset[str], at: datetime | None = None) -> None:
    """Record that `node`'s agent removed the peers with `public_keys` from its interface, their
    final counters sent before (see wire.Removed). Only keys the gateway took off the node
    are affected: a retired key of a re-key, or the key of a peer being removed. Idempotent.
    Locks: node row, then the keys it closes."""
    at = at or timezone.now()
    with transaction.atomic():
        locked = Node.objects.select_for_update().get(pk=node.pk)
        _record_gone(
            locked,
            Q(retired_revision__isnull=False, public_key__in=public_keys),
            Q(public_key__in=public_keys),
            at,
        )


def _record_gone(
    node: Node,
    retired_keys: Q,
    removed_peers: Q,
    at: datetime,
    exclude: frozenset[str] = frozenset(),
) -> None:
    """Keys and peers the node no longer has. Keys retired by a re-key (`retired_keys`) and the
    keys of removed peers (`removed_peers`, among the node's REMOVING peers) are closed: the
    agent sent their final counters before, so no later sample is billed to them. Those peers
    become removed, their address goes into quarantine, and peer_removed fires. Keys in
    `exclude` are left as they are. Call inside a transaction holding the node's row."""
    removing = JobPeer.objects.filter(node=node, state=JobPeer.State.REMOVING).filter(removed_peers)
    # Closed before the receivers below lock orders, so this never holds an order row while it
    # waits for a key row that a metering sample holds.
    gone = retired_keys | Q(job_peer__in=removing.values("pk"))
    _close_keys(
        JobPeerKey.objects.filter(gone, job_peer__node=node).exclude(public_key__in=exclude), at
    )
    for peer in removing.exclude(public_key__in=exclude):
        if JobPeer.objects.filter(pk=peer.pk, state=JobPeer.State.REMOVING).update(
            state=JobPeer.State.REMOVED, removed_at=at
        ):
            peer.refresh_from_db()
            if peer.allocation_id is not None:
                release_address(peer.allocation)
            peer_removed.send(sender=JobPeer, job_peer=peer, at=at)


# --- the agent channel ----------------------------------------------------------------------


class AgentRefused(Exception):
    """An agent's frame was refused; `close_code` tells the agent whether to retry."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


def authenticate_agent(envelope: Mapping[str, Any], *, challenge: str) -> Node:
    """Check an AGENT_AUTH answer to this connection's `challenge`: the node exists and is not
    revoked, the signature is its identity's, the challenge is ours and the clock is close."""
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    try:
        auth = wire.AgentAuth.from_dict(body if isinstance(body, Mapping) else {})
    except wire.ProtocolError as exc:
        raise AgentRefused(f"bad auth message: {exc}", wire.CLOSE_BAD_MESSAGE) from None
    node = Node.objects.filter(node_id=auth.node_id).first()
    if node is None or node.revoked_at is not None:
        raise AgentRefused("unknown or revoked node: enrol again", wire.CLOSE_FORBIDDEN)
    try:
        wire.open_envelope(envelope, base64.b64decode(node.identity_public_key), wire.AGENT_AUTH)
    except wire.BadSignature as exc:
        raise AgentRefused(f"auth signature refused: {exc}", wire.CLOSE_AUTH_FAILED) from None
    if not secrets.compare_digest(auth.challenge, challenge):
        raise AgentRefused("auth answers another connection's challenge", wire.CLOSE_AUTH_FAILED)
    try:
        wire.check_fresh(
            auth.timestamp,
            int(timezone.now().timestamp()),
            max_skew=settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS,
        )
    except wire.StaleMessage as exc:
        raise AgentRefused(f"stale auth: {exc}", wire.CLOSE_AUTH_FAILED) from None
    return node


def record_heartbeat(
    node: Node, observed_ip: str | None = None, at: datetime | None = None
) -> None:
    """Mark `node` seen now (or at `at`). `node` is the row as read before this heartbeat: its
    owner's pages are told only when that changes what they show (offline to online, a new
    source address), not on every heartbeat.

    A heartbeat after a silence longer than MOLT_NODE_OFFLINE_AFTER_SECONDS records a
    NodeOutage from the last heartbeat to this one (billing leaves it out). last_seen_at is
    compare-and-set against the value read, so of two racing heartbeats one records the gap, and
    it never moves back."""
    at = at or timezone.now()
    fields: dict[str, Any] = {"last_seen_at": at}
    if observed_ip:
        fields["observed_ip"] = observed_ip
    with transaction.atomic():
        previous = Node.objects.values_list("last_seen_at", flat=True).get(pk=node.pk)
        if previous is not None and at <= previous:
            del fields["last_seen_at"]  # a late heartbeat does not move the clock back
        seen = Q(last_seen_at=previous) if previous is not None else Q(last_seen_at__isnull=True)
        changed = bool(fields) and Node.objects.filter(seen, pk=node.pk).update(**fields) == 1
        gap = (at - previous).total_seconds() if previous is not None else 0.0
        if changed and "last_seen_at" in fields and gap > settings.MOLT_NODE_OFFLINE_AFTER_SECONDS:
            NodeOutage.objects.create(node_id=node.pk, started_at=previous, ended_at=at)
    if not node.online or (observed_ip and observed_ip != node.observed_ip):
        notify_owner(node, "online")


_GPU_FIELDS = ("index", "name", "memory_mb", "uuid", "driver_version", "cuda_version", "simulated")


def update_inventory(
    node: Node,
    gpus: list[Mapping[str, Any]],
    health: list[Mapping[str, Any]] | None = None,
    reason: str = "",
) -> None:
    """Take the node's GPU inventory as its agent reports it (NVML or simulated).

    An empty report with a reason (the driver failed to answer) keeps the GPUs we know and
    records the reason: a hiccup must not make listed GPUs vanish. Live readings (temperature,
    utilisation) update in place."""
    parsed = tuple(wire.GpuInfo.from_dict(gpu) for gpu in gpus)
    changed = False
    with transaction.atomic():
        Node.objects.select_for_update().get(pk=node.pk)
        if parsed:
            known = list(node.gpus.order_by("index").values_list(
                "index", "name", "memory_mb", "uuid", "simulated"
            ))  # fmt: skip
            reported = [(g.index, g.name, g.memory_mb, g.uuid, g.simulated) for g in parsed]
            if known != reported:
                try:
                    _replace_gpus(node, parsed)
                except EnrollmentRefused as exc:
                    raise AgentRefused(str(exc), wire.CLOSE_BAD_MESSAGE) from None
                changed = True
        elif reason:
            record_report(node, f"GPU inventory: {reason}")
        for reading in health or []:
            if not isinstance(reading, Mapping) or not isinstance(reading.get("index"), int):
                continue
            values = {
                "temperature_c": _small_int(reading.get("temperature_c")),
                "utilization_pct": _small_int(reading.get("utilization_pct")),
            }
            # Only a reading that differs is written (and so announced).
            changed |= bool(
                Gpu.objects.filter(node=node, index=reading["index"])
                .exclude(**values)
                .update(**values)
            )
        # The agent resends its inventory every minute: the owner's pages hear of a difference.
        if changed:
            notify_owner(node, "inventory")


def _small_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1000:
        return value
    return None


_NodeMessage = TypeVar("_NodeMessage", wire.Ack, wire.Removed, wire.MeteringSample)


def _open_node_message(
    node: Node, envelope: object, kind: str, message: type[_NodeMessage], what: str
) -> _NodeMessage:
    """The body of a message `node` signed, of `kind`, parsed as `message`; AgentRefused (4400)
    when the signature is not the node's, the body is malformed or it names another node."""
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    try:
        wire.open_envelope(envelope, base64.b64decode(node.identity_public_key), kind)
        parsed = message.from_dict(body if isinstance(body, Mapping) else {})
    except (wire.BadSignature, wire.ProtocolError) as exc:
        raise AgentRefused(f"{what} refused: {exc}", wire.CLOSE_BAD_MESSAGE) from None
    if parsed.node_id != node.node_id:
        raise AgentRefused(f"{what} names another node", wire.CLOSE_BAD_MESSAGE)
    return parsed


def process_ack(node: Node, envelope: Mapping[str, Any]) -> wire.Ack:
    """Verify a signed ACK from `node` and record it (see acknowledge_revision). An ack of the
    first version (an agent not yet upgraded) has no `removing`: its removals are done."""
    sent_as = envelope.get("kind") if isinstance(envelope, Mapping) else None
    kind = wire.ACK_V1 if sent_as == wire.ACK_V1 else wire.ACK
    ack = _open_node_message(node, envelope, kind, wire.Ack, "ack")
    if kind == wire.ACK_V1 and ack.removing:
        raise AgentRefused("ack refused: a v1 ack has no removing", wire.CLOSE_BAD_MESSAGE)
    try:
        acknowledge_revision(
            node, ack.revision, ack.failed_keys, removing_keys=frozenset(ack.removing)
        )
    except ValueError as exc:
        raise AgentRefused(str(exc), wire.CLOSE_BAD_MESSAGE) from None
    return ack


def process_removed(node: Node, envelope: Mapping[str, Any]) -> wire.Removed:
    """Verify a signed REMOVED message from `node` and record it (see record_removed)."""
    removed = _open_node_message(node, envelope, wire.REMOVED, wire.Removed, "removal report")
    record_removed(node, frozenset(removed.public_keys))
    return removed


def ingest_metering(node: Node, envelope: Mapping[str, Any]) -> int:
    """Store a signed metering sample from `node` once and turn its counters into deltas.

    Each public key in the sample is resolved to the open JobPeerKey of `node` that has it (the
    peer's current key, or one retired by a re-key whose final counters are still to come; see
    JobPeerKey); keys with none are ignored. The delta against that key's own base (see
    meshnet.metering) is added to the key's totals under a row lock, and each peer's bytes over
    its keys are announced once with peer_traffic, all in one transaction with the stored
    sample. A resent sample (same boot_id and seq) changes nothing. Returns the number of peers
    billed. Locks: the node's row, then the keys in the sample in id order, then (through
    peer_traffic) the orders."""
    sample = _open_node_message(
        node, envelope, wire.METERING, wire.MeteringSample, "metering sample"
    )
    sampled_at = datetime.fromtimestamp(sample.sampled_at, tz=UTC)
    with transaction.atomic():
        # The node's row first, as an ack, a revocation and a stop take it: the stored sample's
        # foreign key is checked at commit (deferred) with a share lock on that row, which would
        # otherwise come after the key rows below and deadlock with an ack that holds the node
        # and waits for them. One node's samples and acks arrive on one connection, in turn,
        # so this lock costs no waiting in the normal course.
        Node.objects.select_for_update().filter(pk=node.pk).first()
        try:
            with transaction.atomic():
                MeteringSample.objects.create(
                    node=node,
                    boot_id=sample.boot_id,
                    seq=sample.seq,
                    sampled_at=sampled_at,
                    body=dict(envelope["body"]),  # verified above: the signed object
                    signature=str(envelope.get("signature", "")),
                )
        except IntegrityError:
            return 0  # already stored: a resend after a lost connection
        keys = _open_keys(node, {counters.public_key for counters in sample.peers})
        per_peer: dict[int, tuple[JobPeer, int, int]] = {}
        for counters in sample.peers:
            key = keys.get(counters.public_key)
            if key is None:
                continue
            # A fresh key (epoch 0, zero counters) is the same base as "nothing seen yet".
            previous = metering.Counters(key.epoch, key.rx_bytes, key.tx_bytes)
            current = metering.Counters(counters.epoch, counters.rx_bytes, counters.tx_bytes)
            if current.epoch < previous.epoch:
                continue  # a late sample from an older epoch: keep the newer base
            rx, tx = metering.delta(previous, current)
            JobPeerKey.objects.filter(pk=key.pk).update(
                epoch=current.epoch,
                rx_bytes=current.rx_bytes,
                tx_bytes=current.tx_bytes,
                total_rx_bytes=F("total_rx_bytes") + rx,
                total_tx_bytes=F("total_tx_bytes") + tx,
                last_sample_at=sampled_at,
            )
            # A key listed twice in one sample is compared with its own first listing.
            key.epoch = current.epoch
            key.rx_bytes, key.tx_bytes = current.rx_bytes, current.tx_bytes
            _, peer_rx, peer_tx = per_peer.get(key.job_peer_id, (key.job_peer, 0, 0))
            per_peer[key.job_peer_id] = (key.job_peer, peer_rx + rx, peer_tx + tx)
        billed = 0
        for peer, rx, tx in per_peer.values():
            if rx or tx:
                peer_traffic.send(sender=JobPeer, job_peer=peer, rx_bytes=rx, tx_bytes=tx)
                billed += 1
    return billed


def _open_keys(node: Node, public_keys: set[str]) -> dict[str, JobPeerKey]:
    """The open keys of `node` among `public_keys`, locked in id order (a node has a handful of
    open keys; the sample may list many). An open key is on one peer only (peer_key_open_once),
    and a key closed meanwhile by an ack is not taken: the lock re-reads the row."""
    candidates = [
        pk
        for pk, public_key in JobPeerKey.objects.filter(
            job_peer__node=node, closed_at__isnull=True
        ).values_list("pk", "public_key")
        if public_key in public_keys
    ]
    if not candidates:
        return {}
    locked = (
        JobPeerKey.objects.select_for_update(of=("self",))
        .filter(pk__in=candidates, closed_at__isnull=True)
        .select_related("job_peer")
        .order_by("pk")
    )
    return {key.public_key: key for key in locked}


def _close_keys(keys: Any, at: datetime) -> int:
    """Close the open keys among `keys` (a JobPeerKey queryset) at `at`, locking them in id order
    as ingest_metering does, so the two never wait on each other in a circle."""
    pks = list(
        keys.filter(closed_at__isnull=True)
        .select_for_update(of=("self",))
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not pks:
        return 0
    return JobPeerKey.objects.filter(pk__in=pks, closed_at__isnull=True).update(closed_at=at)


def close_out_silent_nodes(now: datetime | None = None) -> int:
    """Close out the peer removals no agent will acknowledge: on a node (not revoked) silent
    for MOLT_NODE_ABANDONED_AFTER_SECONDS, peers still `removing` become `removed`, their job
    addresses go into quarantine and their keys are closed (so the key and the address can be
    used again). Their orders ended long before, through the node-failure grace, so no order
    is told. If the node comes back, its agent gets a desired state without these peers and
    removes them; samples of their closed keys count nothing. Returns how many peers.

    Locks: each node row in turn (re-checking its silence under the lock, so a heartbeat that
    just arrived keeps its peers), then the keys it closes, as revoke_node does."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.MOLT_NODE_ABANDONED_AFTER_SECONDS)
    candidates = (
        Node.objects.filter(
            revoked_at__isnull=True,
            last_seen_at__lt=cutoff,
            job_peers__state=JobPeer.State.REMOVING,
        )
        .distinct()
        .values_list("pk", flat=True)
    )
    closed = 0
    for node_pk in list(candidates):
        with transaction.atomic():
            node = Node.objects.select_for_update().get(pk=node_pk)
            if node.revoked_at is not None or node.last_seen_at is None:
                continue
            if node.last_seen_at >= cutoff:
                continue
            peers = list(
                JobPeer.objects.filter(node=node, state=JobPeer.State.REMOVING).select_related(
                    "allocation"
                )
            )
            for peer in peers:
                JobPeer.objects.filter(pk=peer.pk, state=JobPeer.State.REMOVING).update(
                    state=JobPeer.State.REMOVED, removed_at=now
                )
                if peer.allocation is not None:
                    release_address(peer.allocation)
            _close_keys(JobPeerKey.objects.filter(job_peer__in=peers), now)
            closed += len(peers)
            log.warning(
                "node %s silent since %s: %d peer removal(s) closed out without its ack",
                node.name,
                node.last_seen_at.isoformat(),
                len(peers),
            )
    return closed


def record_report(node: Node, detail: object) -> None:
    """Keep the agent's last complaint on the node (shown to operators)."""
    text = str(detail or "")[:500]
    log.warning("node %s reports: %s", node.name, text)
    Node.objects.filter(pk=node.pk).update(last_report=text, last_report_at=timezone.now())


def replace_peer_key(ref: str, public_key: str) -> JobPeer:
    """Give the live peer named `ref` a new public key (its buyer re-keyed) and keep its job
    address. The node's desired state gets a new revision without the old key and with the new
    one: the agent's reconcile (keyed by public key) removes the old peer and adds the new. The
    peer is `desired` again until the agent acknowledges that revision.

    The old key is retired at that revision, not forgotten: until the agent acknowledges it, the
    node's samples that carry the old key (the periodic ones meanwhile, and the final counters the
    agent sends just before removing it) are still billed to this peer, against the old key's
    own base. The new key gets its own JobPeerKey with a zero base (its counters start at zero,
    under an epoch of its own). Going back to a key of this peer that is retired but not yet
    closed makes it current again, with the base it has.

    Locks: node row, then the peer's keys. Raises InvalidPeerKey, PeerKeyInUse (the key is open
    on another peer) and MeshError when no live peer is named `ref`."""
    from meshnet.errors import MeshError

    validate_peer_key(public_key)
    with transaction.atomic():
        peer = JobPeer.objects.filter(ref=ref).first()
        if peer is None:
            raise MeshError(f"no job peer {ref}")
        Node.objects.select_for_update().get(pk=peer.node_id)
        peer.refresh_from_db()
        if peer.state not in (JobPeer.State.DESIRED, JobPeer.State.ACTIVE):
            raise MeshError(f"job peer {ref} is {peer.state}: it cannot be re-keyed")
        if peer.public_key == public_key:
            return peer
        if _key_in_use(public_key, peer=peer):
            raise PeerKeyInUse(KEY_IN_USE)
        _bump_revision(peer.node_id)
        revision = Node.objects.values_list("desired_revision", flat=True).get(pk=peer.node_id)
        now = timezone.now()
        try:
            with transaction.atomic():
                JobPeer.objects.filter(pk=peer.pk).update(
                    public_key=public_key,
                    state=JobPeer.State.DESIRED,
                    added_revision=revision,
                    acked_at=None,
                )
                # Retired first: the peer has one current key at every step.
                JobPeerKey.objects.filter(job_peer=peer, retired_at__isnull=True).update(
                    retired_at=now, retired_revision=revision
                )
                back = JobPeerKey.objects.filter(
                    job_peer=peer, public_key=public_key, closed_at__isnull=True
                ).update(retired_at=None, retired_revision=None, added_revision=revision)
                if not back:
                    JobPeerKey.objects.create(
                        job_peer=peer,
                        public_key=public_key,
                        active_from=now,
                        added_revision=revision,
                    )
        except IntegrityError:
            raise PeerKeyInUse(KEY_IN_USE) from None
        _push_on_commit(peer.node_id)
        peer.refresh_from_db()
        log.info("job peer %s re-keyed at revision %s", ref, revision)
        return peer


# --- events for pages and agents, and revocation ------------------------------------------------


def owner_group(user_id: int) -> str:
    """The Channels group of one provider's open pages (frontend.provider_consumers)."""
    return f"owner.{user_id}"


def _group_send_on_commit(group: str, message: dict[str, Any]) -> None:
    """The one way meshnet talks to Channels groups from a write path: after commit (a rolled
    back change is never announced), at most once (the channel layer may drop it), and never
    failing the write that already committed: whoever misses a message catches up from the
    database (a page on reload, an agent on reconnect)."""

    def send() -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:
            log.warning("could not send %s to group %s", message.get("type"), group, exc_info=True)

    transaction.on_commit(send, robust=True)


def notify_owner(node: Node, change: str) -> None:
    """Tell `node`'s owner's open pages that the node changed (`change`: enrolled, online,
    inventory, revoked). The message names the node only: the page's consumer re-checks who is
    logged in and the page fetches what it shows through its own authorized view."""
    _group_send_on_commit(
        owner_group(node.owner_id), {"type": "node.changed", "node": node.pk, "change": change}
    )


def revoke_node(node: Node, reason: str = "revoked by an operator") -> bool:
    """Cut `node` off the mesh for good. Returns True when this call revoked it, False when it
    already was (the clean-up below still runs, so calling again re-drives a clean-up that a
    crash interrupted).

    1. revoked_at is set by compare-and-set and committed on its own: from then on the agent's
       frames and any new auth are refused, its listings are no longer available, and its agent
       connection is told to close (after commit, through its group).
    2. node_revoked fires outside any lock; marketplace fails the node's live orders there,
       each in its own transaction in the market's lock order (order row, then this node row).
    3. Job peers still live on the node are closed out (removed now, addresses quarantined):
       no agent will acknowledge their removal any more. Locks: node row, one transaction.
    """
    now = timezone.now()
    with transaction.atomic():
        revoked = bool(
            Node.objects.filter(pk=node.pk, revoked_at__isnull=True).update(revoked_at=now)
        )
        node.refresh_from_db()
        if revoked:
            from meshnet.tasks import node_group

            _group_send_on_commit(node_group(node.node_id), {"type": "node.revoked"})
            notify_owner(node, "revoked")
            log.warning("node %s revoked: %s", node.name, reason)
    node_revoked.send(sender=Node, node=node, reason=reason)
    with transaction.atomic():
        Node.objects.select_for_update().get(pk=node.pk)
        for peer in JobPeer.objects.filter(node=node).live().select_related("allocation"):
            JobPeer.objects.filter(pk=peer.pk).update(
                state=JobPeer.State.REMOVED, removed_at=peer.removed_at or now
            )
            if peer.allocation is not None:
                release_address(peer.allocation)
        # A revoked node's samples are refused: its keys take nothing more and may be reused.
        _close_keys(JobPeerKey.objects.filter(job_peer__node=node), now)
    return revoked
